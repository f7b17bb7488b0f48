"""Reload best checkpoints the way a plain-transformers user does, and re-measure their dev metric.

    python benchmarks/reload_check.py outputs/<run> [outputs/<run> ...]

For each run: ``from_pretrained(model_source, num_labels=...)`` + ``load_state_dict(torch.load(
best_acc_classify.pth, weights_only=True))``, then accuracy on the run's validation file, read with
the run's own column settings, one example at a time (no padding). Prints it beside the accuracy
the run recorded. Single-label runs only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from engine.sources import read_table


def recheck(run: Path) -> tuple[float, float]:
    info = json.loads((run / "best_acc_classify.json").read_text())
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    model = AutoModelForSequenceClassification.from_pretrained(info["model_source"], num_labels=info["num_labels"])
    model.load_state_dict(torch.load(run / "best_acc_classify.pth", weights_only=True))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(info["model_source"])
    data = cfg.data
    table = read_table(data.validation_file, data)
    names = list(data.label_names) if data.label_names else None
    correct = 0
    with torch.no_grad():
        for _, row in table.iterrows():
            pair = (row[data.text_pair_column],) if data.text_pair_column else ()
            encoded = tokenizer(
                row[data.text_column], *pair, truncation=True, max_length=data.max_length, return_tensors="pt"
            )
            label = row[data.label_column]
            gold = names.index(label) if names and label in names else int(label)
            correct += int(model(**encoded).logits.argmax(-1).item() == gold)
    return correct / len(table), info["metrics"]["accuracy"]


def main() -> None:
    hf_logging.set_verbosity_error()  # the load report lists the classifier head as newly made
    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    for run in parser.parse_args().runs:
        got, recorded = recheck(run)
        print(f"{run}: reloaded {got:.4f}, recorded {recorded:.4f}, {'same' if got == recorded else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
