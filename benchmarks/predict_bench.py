"""Prediction speed in one sitting: our API, predict.py's file path, and the transformers pipeline at
fp32 and under bf16 autocast, on the same exported run and the same MRPC test pairs, batch 64.

    python benchmarks/predict_bench.py                        # trains a short run first (~2-4 min here)
    python benchmarks/predict_bench.py --run outputs/<run>    # an existing run (dir or .pth)
    python benchmarks/predict_bench.py --rounds 5 --every 1   # more rounds, every pair

Arms, interleaved: each round runs every arm once, in turn, so a slow spell of the machine hits all.
- ours: ``load_classifier(run).predict(pairs, batch_size=64)``, ``precision=auto`` (bf16 autocast
  where the device computes bf16 natively, else fp32); where auto is not fp32, also ``precision=no``.
- predict.py on a file: ``predict_file`` in-process (what ``predict.py input_file=...`` runs once the
  model is loaded): reading the TSV in chunks, predicting, writing the predictions file.
- the transformers pipeline on the exported run (``TextClassifier.export``),
  ``pipeline("text-classification", model=<export>)(pairs, batch_size=64, truncation=True)``: at
  fp32, and inside ``torch.autocast(<device>, dtype=torch.bfloat16)``.
Start-up is excluded: every model is loaded once, before the rounds, and each arm runs one warm-up
batch. Each arm's labels are compared with the fp32 pipeline's. Where the CPU has no native bf16,
bf16 autocast is emulated (several times slower than fp32); the default then runs every arm on every
4th pair so that the whole benchmark stays within ~10 minutes. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH = 64
TRAIN_OVERRIDES = ["trainer.max_steps=150", "optim.lr=8e-5", "trainer.progress=false", "logger=[jsonl]"]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def train_short_run(folder: Path) -> Path:
    """A short run of the defaults (the bundled MiniLM on MRPC) into ``folder``."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *TRAIN_OVERRIDES,
        f"output_dir={folder / 'run'}",
        f"data.cache_dir={folder / 'cache'}",
        "trainer.save_state=false",
    ]
    print(f"training a short run: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
    return folder / "run"


def mrpc_test(every: int):
    import pandas as pd

    frame = pd.read_csv(
        ROOT / "data/mrpc/test.tsv",
        sep="\t",
        quoting=csv.QUOTE_NONE,
        encoding="utf-8-sig",
        dtype=str,
        keep_default_na=False,
    )
    return frame.iloc[::every].reset_index(drop=True)


def agreement(labels: list[str], reference: list[str]) -> str:
    same = sum(a == b for a, b in zip(labels, reference, strict=True))
    return f"{100 * same / len(reference):.2f}% ({same}/{len(reference)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run (dir or best_acc_classify.pth); default: train a short one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, help="every k-th test pair; default 1, or 4 where bf16 is emulated")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import pandas as pd
    import torch
    from transformers import pipeline

    from engine.backend import native_bf16
    from engine.predict import load_classifier, predict_file

    device = torch.device(args.device)
    native = native_bf16(device.type)
    every = args.every or (1 if native else 4)
    workdir = Path(tempfile.mkdtemp(prefix="predict_bench_"))
    run = Path(args.run) if args.run else train_short_run(workdir)

    ours = load_classifier(run, device)
    arms_ours = {f"ours: load_classifier(run).predict, precision=auto ({ours.precision.value})": ours}
    if ours.precision.value != "no":
        arms_ours["ours: load_classifier(run, precision='no').predict (fp32)"] = load_classifier(run, device, "no")
    export = ours.export(workdir / "hf")
    pipe = pipeline("text-classification", model=str(export), device=device)

    frame = mrpc_test(every)
    texts, pairs = frame["#1 String"].tolist(), frame["#2 String"].tolist()
    inputs = [{"text": a, "text_pair": b} for a, b in zip(texts, pairs, strict=True)]
    table = workdir / "pairs.tsv"
    frame.to_csv(table, sep="\t", index=False, quoting=csv.QUOTE_NONE)
    output = workdir / "pairs.predictions.tsv"

    def run_ours(classifier) -> Callable[[list[int] | None], list[str]]:
        def go(rows: list[int] | None = None) -> list[str]:
            chosen = list(zip(texts, pairs, strict=True)) if rows is None else [(texts[i], pairs[i]) for i in rows]
            return [p.label for p in classifier.predict(chosen, batch_size=BATCH)]

        return go

    def run_file(rows: list[int] | None = None) -> list[str]:
        source = table
        if rows is not None:  # the warm-up: a small file of its own
            source = workdir / "warmup.tsv"
            frame.iloc[rows].to_csv(source, sep="\t", index=False, quoting=csv.QUOTE_NONE)
        written = predict_file(ours, source, output if rows is None else None, batch_size=BATCH, progress=False)
        return pd.read_csv(written, sep="\t")["label"].tolist()

    def run_pipe(bf16: bool) -> Callable[[list[int] | None], list[str]]:
        def go(rows: list[int] | None = None) -> list[str]:
            chosen = inputs if rows is None else [inputs[i] for i in rows]
            context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with torch.inference_mode(), context:
                return [r["label"] for r in pipe(chosen, batch_size=BATCH, truncation=True)]

        return go

    pipe_fp32 = "transformers pipeline, fp32"
    pipe_bf16 = f"transformers pipeline in torch.autocast({device.type!r}, bfloat16)"
    arms = {name: run_ours(classifier) for name, classifier in arms_ours.items()}
    arms["predict.py on a file (predict_file in-process: read TSV, predict, write)"] = run_file
    arms[pipe_fp32] = run_pipe(False)
    arms[pipe_bf16] = run_pipe(True)
    first = next(iter(arms))

    print(
        f"device: {device} ({cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"native bf16: {'yes' if native else 'no (bf16 autocast is emulated here)'}; "
        f"precision=auto resolves to {ours.precision.value}"
    )
    print(f"run: {run}; exported to {export}")
    print(
        f"data: MRPC test split, every {every} pair(s): {len(inputs)} pairs; batch {BATCH}; "
        f"{args.rounds} rounds, arms interleaved; start-up excluded",
        flush=True,
    )

    warmup = list(range(min(BATCH, len(inputs))))
    for go in arms.values():
        go(warmup)
    rates: dict[str, list[float]] = {name: [] for name in arms}
    labels: dict[str, list[str]] = {}
    for round_number in range(1, args.rounds + 1):
        for name, go in arms.items():
            started = time.perf_counter()
            labels[name] = go(None)
            rates[name].append(len(inputs) / (time.perf_counter() - started))
        print(f"round {round_number}: " + " | ".join(f"{rates[n][-1]:.1f}" for n in arms) + " pairs/s", flush=True)

    print()
    print("| arm | pairs/s per round | median | labels agree with the fp32 pipeline |")
    print("|---|---|---|---|")
    for name in arms:
        per_round = " / ".join(f"{r:.1f}" for r in rates[name])
        print(
            f"| {name} | {per_round} | {statistics.median(rates[name]):.1f} | "
            f"{agreement(labels[name], labels[pipe_fp32])} |"
        )
    print()
    for name, peer in ((first, pipe_fp32), (first, pipe_bf16), (pipe_bf16, pipe_fp32)):
        ratios = [a / b for a, b in zip(rates[name], rates[peer], strict=True)]
        print(f"{name} / {peer}: {statistics.median(ratios):.2f}x (median of per-round ratios)")
    best_peer = max((pipe_fp32, pipe_bf16), key=lambda n: statistics.median(rates[n]))
    ratios = [a / b for a, b in zip(rates[first], rates[best_peer], strict=True)]
    print(f"ours / the pipeline at its best here ({best_peer}): {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
