"""Inference from best_acc_classify.pth: Python API, CLI, eval-only, export, strict and safe loading."""

from __future__ import annotations

import json
import pickle
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from engine.checkpoint import CheckpointError
from engine.loop import train
from engine.predict import load_classifier, predict_file
from tests.conftest import PYTHON, ROOT, TINY, PicklePayload, compose_cfg, subprocess_env

DEV = ROOT / "data" / "mrpc" / "dev.tsv"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(run, run / "cache", *TINY, "trainer.epochs=2")
    train(cfg)
    return run


def _dev(n=40):
    return pd.read_csv(DEV, sep="\t", quoting=3, encoding="utf-8-sig", dtype=str).iloc[:n]


def test_load_classifier_reproduces_the_stored_dev_metric(run_dir):
    info = json.loads((run_dir / "best_acc_classify.json").read_text())
    classifier = load_classifier(run_dir)
    dev = _dev()
    predictions = classifier.predict(list(zip(dev["#1 String"], dev["#2 String"], strict=True)), batch_size=7)
    truth = [info["id2label"][label] for label in dev["Quality"]]
    accuracy = np.mean([p.label == t for p, t in zip(predictions, truth, strict=True)])
    assert accuracy == info["metric_value"]
    assert set(predictions[0].probabilities) == {"not_equivalent", "equivalent"}
    assert sum(predictions[0].probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_export_gives_the_same_logits_and_works_in_a_pipeline(run_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    classifier = load_classifier(run_dir / "best_acc_classify.pth")
    folder = classifier.export(tmp_path / "hf")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "not_equivalent", "1": "equivalent"}
    exported = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    texts = ["A man is playing a guitar.", "Shares rose 5 percent on Monday after the report ."]
    encoded = classifier.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(exported(**encoded).logits.numpy(), classifier.logits(texts), atol=1e-5)
    pipe = pipeline("text-classification", model=str(folder), device="cpu")
    result = pipe(texts[0])
    assert result[0]["label"] in {"not_equivalent", "equivalent"}
    assert result[0]["score"] == pytest.approx(max(classifier.predict(texts[0])[0].probabilities.values()), abs=1e-5)


def test_file_to_file_prediction_keeps_order_and_count(run_dir, tmp_path):
    dev = _dev(23)
    source = tmp_path / "pairs.tsv"
    dev.to_csv(source, sep="\t", index=False, quoting=3)
    classifier = load_classifier(run_dir)
    output = predict_file(classifier, source, progress=False, batch_size=4)
    assert output.name == "pairs.predictions.tsv"
    predicted = pd.read_csv(output, sep="\t")
    assert len(predicted) == 23
    expected = classifier.predict(list(zip(dev["#1 String"], dev["#2 String"], strict=True)), batch_size=1)
    assert predicted["label"].tolist() == [p.label for p in expected]
    np.testing.assert_allclose(
        predicted["prob_equivalent"], [p.probabilities["equivalent"] for p in expected], atol=1e-5
    )


def test_predict_cli_text_and_file(run_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    text = ["text=The cat sat .", "text_pair=A cat sat ."]
    result = subprocess.run(
        [PYTHON, str(ROOT / "predict.py"), f"checkpoint={run_dir}", *text, f"input_file={DEV}", f"output_file={out}"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("label: ") and "not_equivalent: 0." in result.stdout
    assert f"predictions written to {out}" in result.stdout
    assert len(out.read_text().splitlines()) == 408
    assert not list(tmp_path.glob("outputs"))  # prediction makes no run directory


def test_eval_only_run_on_the_test_split(run_dir, tmp_path):
    result = subprocess.run(
        [
            PYTHON,
            str(ROOT / "train.py"),
            "trainer.do_train=false",
            f"checkpoint={run_dir}",
            "data.eval_split=test",
            "data.max_eval_samples=50",
            "trainer.progress=false",
            f"hydra.run.dir={tmp_path}/eval",
            f"data.cache_dir={tmp_path}/cache",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["samples"] == 50 and metrics["source"].endswith("test.tsv")
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # trainer.mixed_precision=auto, resolved as prediction resolves it: bf16 where native, else fp32
    assert metrics["precision"] == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no")
    assert not (tmp_path / "eval" / "best_acc_classify.pth").exists()


def test_eval_only_on_dev_equals_the_stored_metric(run_dir, make_cfg):
    value = train(
        make_cfg(
            "trainer.do_train=false", f"checkpoint={run_dir}", "data.max_eval_samples=40", "trainer.progress=false"
        )
    )
    assert value == json.loads((run_dir / "best_acc_classify.json").read_text())["metric_value"]


def test_mismatched_checkpoint_lists_keys_and_shapes(run_dir, tmp_path):
    state = torch.load(run_dir / "best_acc_classify.pth", weights_only=True)
    state["classifier.weight"] = torch.zeros(3, state["classifier.weight"].shape[1])
    state["classifier.bias"] = torch.zeros(3)
    del state["bert.pooler.dense.bias"]
    state["module.extra.weight"] = torch.zeros(1)  # prefixes are stripped, the rest is unexpected
    torch.save(state, tmp_path / "best_acc_classify.pth")
    (tmp_path / "best_acc_classify.json").write_text((run_dir / "best_acc_classify.json").read_text())
    with pytest.raises(CheckpointError) as info:
        load_classifier(tmp_path)
    message = str(info.value)
    assert "classifier.weight: checkpoint (3, 32) vs model (2, 32)" in message
    assert "missing keys (1): bert.pooler.dense.bias" in message
    assert "unexpected keys (1): extra.weight" in message


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_a_pickle_that_runs_code_is_refused(run_dir, tmp_path, force_unsafe_env):
    marker = tmp_path / "pwned"
    with open(tmp_path / "best_acc_classify.pth", "wb") as handle:
        pickle.dump({"classifier.weight": PicklePayload(marker)}, handle)
    (tmp_path / "best_acc_classify.json").write_text((run_dir / "best_acc_classify.json").read_text())
    env = subprocess_env()
    if force_unsafe_env:
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    result = subprocess.run(
        [PYTHON, str(ROOT / "predict.py"), f"checkpoint={tmp_path}", "text=hello"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "not a safe weights file" in result.stderr
    assert not marker.exists()


def test_engine_exports_load_classifier():
    from engine import load_classifier
    from engine.predict import load_classifier as direct

    assert load_classifier is direct


def test_predict_with_nothing_to_do_says_so_before_loading_anything(tmp_path):
    from omegaconf import OmegaConf

    from engine.config import PredictConfig
    from engine.errors import EngineError
    from engine.predict import predict_cli

    missing = tmp_path / "no_such_run"  # never opened: the request is checked first
    with pytest.raises(EngineError, match=r'^nothing to do: give text="\.\.\.", input_file=<file> or export_dir='):
        predict_cli(OmegaConf.structured(PredictConfig(checkpoint=str(missing))))
