"""End-to-end runs of the loop on the tiny model and the bundled MiniLM."""

from __future__ import annotations

import json
import re
import subprocess
import time

import numpy as np
import pytest
import torch

from engine import checkpoint
from engine.config import bundled_minilm_path
from engine.loop import train
from tests.conftest import PYTHON, ROOT, TINY, subprocess_env

RUN_FILES = {"best_acc_classify.pth", "best_acc_classify.json", "metrics.jsonl", "train_steps.jsonl", "train.log"}


def test_tiny_run_writes_every_file_and_returns_the_best(make_cfg, tmp_path, monkeypatch):
    from engine import loop

    monkeypatch.setattr(loop, "_runs_in_this_process", 1)  # as if pytest had run another run first
    best = train(make_cfg(*TINY, "trainer.epochs=2"))
    run = tmp_path / "run"
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 2  # one per epoch
    assert best == max(e["accuracy"] for e in evals)
    assert all(e["samples"] == 40 for e in evals)
    steps = [json.loads(line) for line in (run / "train_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 17))  # 64 rows / 8 = 8 steps, 2 epochs
    assert {"loss", "lr", "grad_norm", "samples_per_s", "epoch"} <= set(steps[0])
    assert steps[-1]["lr"] == 0.0  # the linear schedule ends at zero
    info = json.loads((run / "best_acc_classify.json").read_text())
    assert info["metric_name"] == "accuracy" and info["metric_value"] == best
    assert info["num_labels"] == 2 and info["id2label"] == {"0": "not_equivalent", "1": "equivalent"}
    assert info["problem_type"] == "single_label_classification"
    assert info["config"]["model"]["name"] == "tiny"
    assert info["step"] in {e["step"] for e in evals if e["is_best"]}
    assert "eval epoch 1 step 16" in (run / "train.log").read_text()
    # Start-up to the first optimizer step: from this call (pytest ran other runs before).
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["startup_seconds"] < summary["wall_seconds"]
    assert "first optimizer step done" in (run / "train.log").read_text()


def test_warmup_then_linear_decay(make_cfg, tmp_path):
    train(make_cfg(*TINY, "optim.warmup_ratio=0.25", "optim.lr=1e-3"))
    steps = [json.loads(line) for line in (tmp_path / "run" / "train_steps.jsonl").read_text().splitlines()]
    lrs = [s["lr"] for s in steps]  # 8 steps, 2 warm-up steps
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2:] == pytest.approx([1e-3 * (8 - k) / 6 for k in range(3, 9)])


def test_seed_recipe_reproduces_the_stored_dev_metric(make_cfg, tmp_path):
    """from_pretrained(src, num_labels=2) + load_state_dict(torch.load(path, weights_only=True))."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train(
        make_cfg(
            "model=minilm",
            "trainer.mixed_precision=no",  # the plain fp32 re-evaluation below must match exactly
            "trainer.max_steps=3",
            "trainer.batch_size=8",
            "trainer.progress=false",
            "data.max_train_samples=48",
            "data.max_eval_samples=40",
        )
    )
    run = tmp_path / "run"
    info = json.loads((run / "best_acc_classify.json").read_text())
    assert info["model_source"] == bundled_minilm_path()

    model = AutoModelForSequenceClassification.from_pretrained(info["model_source"], num_labels=2)
    model.load_state_dict(torch.load(run / "best_acc_classify.pth", weights_only=True))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(info["model_source"])
    import pandas as pd

    dev = pd.read_csv(ROOT / "data/mrpc/dev.tsv", sep="\t", quoting=3, encoding="utf-8-sig", dtype=str).iloc[:40]
    correct = 0
    with torch.no_grad():
        for _, row in dev.iterrows():
            encoded = tokenizer(
                row["#1 String"], row["#2 String"], truncation=True, max_length=128, return_tensors="pt"
            )
            correct += int(model(**encoded).logits.argmax(-1).item() == int(row["Quality"]))
    assert correct / len(dev) == info["metric_value"] == info["metrics"]["accuracy"]


def test_balanced_class_weights_run(make_cfg, tmp_path):
    train(make_cfg(*TINY, "loss=balanced"))
    assert (tmp_path / "run" / "best_acc_classify.pth").is_file()
    assert "class weights:" in (tmp_path / "run" / "train.log").read_text()


def test_metric_for_best_must_exist(make_cfg):
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="trainer.metric_for_best='auc' is not computed"):
        train(make_cfg(*TINY, "trainer.max_steps=1", "trainer.metric_for_best=auc"))


def test_cli_tiny_run_writes_the_run_directory(tmp_path):
    run = tmp_path / "cli"
    result = subprocess.run(
        [PYTHON, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run}", f"data.cache_dir={tmp_path}/cache"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert RUN_FILES | {".hydra"} <= {p.name for p in run.iterdir()}
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert "eval epoch 0 step 8" in (run / "train.log").read_text()
    state = checkpoint.load_weights(run / "best_acc_classify.pth")
    assert "classifier.weight" in state and np.isfinite(state["classifier.weight"].numpy()).all()
    # python train.py: start-up counts from the process start (imports included).
    summary = json.loads((run / "summary.json").read_text())
    assert re.search(r"first optimizer step done [\d.]+ s after the process started", (run / "train.log").read_text())
    assert summary["startup_seconds"] > 1.0  # importing torch and transformers alone takes longer


@pytest.mark.parametrize("offline_flag", [True, False])
def test_cli_offline_hub_model_fails_fast_with_one_clear_message(tmp_path, offline_flag):
    env = subprocess_env()
    if not offline_flag:  # no HF_HUB_OFFLINE: the unreachable hub itself must be noticed quickly
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.pop(name, None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens there
        env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    started = time.perf_counter()
    result = subprocess.run(
        [PYTHON, str(ROOT / "train.py"), "model=bert-base-uncased", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert time.perf_counter() - started < 60
    assert result.returncode == 2
    assert "cannot load model 'bert-base-uncased'" in result.stderr
    assert "model=minilm" in result.stderr
    assert "Traceback" not in result.stderr


def test_sorted_evaluation_returns_predictions_in_file_order(tmp_path):
    """evaluate() runs the longest rows first but hands back logits and labels row by row."""
    from transformers import AutoTokenizer

    from engine.backend import ManualBackend
    from engine.config import BackendConfig, MixedPrecision, ProblemType
    from engine.data import eval_loader, load_data, make_collator, row_order
    from engine.evaluation import evaluate
    from tests.test_data import mrpc_config
    from tests.test_model import tiny

    data_cfg = mrpc_config(max_train_samples=8, max_eval_samples=45, cache_dir=str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
    bundle = load_data(data_cfg, tokenizer)
    model = tiny(num_labels=2)
    backend = ManualBackend(BackendConfig(use_cuda=False), MixedPrecision.no)
    collator = make_collator(tokenizer, data_cfg)
    single = ProblemType.single_label_classification

    sorted_loader = eval_loader(bundle.eval, 8, collator)
    order = row_order(sorted_loader)
    assert order.tolist() != list(range(45))  # the batches really run in another order
    metrics, logits, labels = evaluate(model, sorted_loader, backend, single, order=order)
    plain = eval_loader(bundle.eval, 8, collator, sort_by_length=False)
    metrics_plain, logits_plain, labels_plain = evaluate(model, plain, backend, single)
    assert labels.tolist() == labels_plain.tolist() == list(bundle.eval["labels"])
    np.testing.assert_allclose(logits, logits_plain, atol=1e-5)
    # One row at a time, no padding at all: the same logits.
    model.eval()
    with torch.inference_mode():
        for row in (0, 17, 44):
            ids = bundle.eval[row]
            single_row = {k: torch.tensor([ids[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
            np.testing.assert_allclose(model(**single_row).logits[0].numpy(), logits[row], atol=1e-5)
    assert metrics["accuracy"] == metrics_plain["accuracy"]


def test_fused_adamw_wherever_torch_has_it(make_cfg):
    from engine.config import OptimConfig
    from engine.optim import build_optimizer

    layer = torch.nn.Linear(4, 2)
    assert build_optimizer(layer, OptimConfig(), torch.device("cpu")).defaults["fused"] is True
    assert not build_optimizer(layer, OptimConfig(fused=False), torch.device("cpu")).defaults["fused"]


def test_compiled_run_keeps_a_plain_checkpoint_and_bucketed_shapes(make_cfg, tmp_path):
    """speedups.compile=true: the encoder is compiled in place, batches padded to length buckets, and
    best_acc_classify.pth has the plain transformers keys (no _orig_mod.)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # The "eager" dynamo backend traces like inductor does but skips code generation: fast enough here.
    train(make_cfg(*TINY, "speedups.compile=true", "speedups.compile_backend=eager", "data.pad_to_multiple_of=16"))
    run = tmp_path / "run"
    log_text = (run / "train.log").read_text()
    assert "torch.compile (backend eager): up to 8 length buckets of 16 tokens" in log_text
    # the dropout and embedding-gradient speed-ups step aside for a compiled model
    assert "speed-ups: first_token_last_layer, compile" in log_text
    state = torch.load(run / "best_acc_classify.pth", weights_only=True)
    assert not any("_orig_mod" in key for key in state)
    info = json.loads((run / "best_acc_classify.json").read_text())
    config = AutoConfig.from_pretrained(
        bundled_minilm_path(), num_labels=2, **info["config"]["model"]["config_overrides"]
    )
    plain = AutoModelForSequenceClassification.from_config(config)
    plain.load_state_dict(state)  # strict: every key matches
    steps = [json.loads(line) for line in (run / "train_steps.jsonl").read_text().splitlines()]
    assert len(steps) == 8 and all(np.isfinite(s["loss"]) for s in steps)


def test_compile_mode_is_checked(make_cfg):
    from engine.config import ConfigError, validate

    with pytest.raises(ConfigError, match="speedups.compile_mode must be .* got 'fastest'"):
        validate(make_cfg(*TINY, "speedups.compile_mode=fastest"))
    assert validate(make_cfg(*TINY, "speedups.compile=true")).data.pad_to_multiple_of == 32
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of must be >= 1 or null, got 0"):
        validate(make_cfg(*TINY, "data.pad_to_multiple_of=0"))


def test_loader_workers_and_pinned_memory_follow_the_device():
    from engine.config import DataConfig
    from engine.data import loader_workers

    data = DataConfig(text_column="text")
    assert loader_workers(data, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
    assert loader_workers(data, torch.device("cuda")) == {"num_workers": 2, "pin_memory": True}
    data.num_workers = 3
    assert loader_workers(data, torch.device("cpu")) == {"num_workers": 3, "pin_memory": False}


def test_the_step_reduces_across_processes_only_at_logging_steps(make_cfg, monkeypatch):
    """The non-finite decision reads the all-reduced gradient norm; the stop signal is all-reduced
    every trainer.log_every steps, not every step."""
    from engine.backend import ManualBackend

    calls = []
    monkeypatch.setattr(ManualBackend, "any_process", lambda self, flag: calls.append(flag) or bool(flag))
    train(make_cfg(*TINY, "trainer.log_every=4"))  # 64 rows, batch 8: 8 steps
    assert len(calls) == 2


def test_a_backend_that_returns_no_gradient_norm_trains(make_cfg, tmp_path, monkeypatch):
    """DeepSpeed clips inside its engine and returns None for the norm: the loop goes on."""
    from engine.backend import ManualBackend

    real = ManualBackend.clip_grad_norm_
    monkeypatch.setattr(ManualBackend, "clip_grad_norm_", lambda self, *a: (real(self, *a), None)[1])
    assert 0.0 <= train(make_cfg(*TINY)) <= 1.0
    steps = [json.loads(x) for x in (tmp_path / "run" / "train_steps.jsonl").read_text().splitlines()]
    assert len(steps) == 8 and all(s["grad_norm"] is None for s in steps)


def test_only_a_fused_adam_skips_on_the_device():
    from engine.optim import device_skippable

    parameter = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.AdamW([parameter], fused=True)

    class Wrapper:  # as Accelerate wraps an optimizer
        optimizer = fused

    assert device_skippable(fused) is fused and device_skippable(Wrapper()) is fused
    assert device_skippable(torch.optim.AdamW([parameter], foreach=True)) is None
    assert device_skippable(torch.optim.SGD([parameter], lr=0.1)) is None
    weights, (parameter.grad, fused.found_inf) = (
        parameter.detach().clone(),
        (torch.full((3,), float("nan")), torch.ones(())),
    )
    fused.step()
    assert torch.equal(parameter.detach(), weights) and fused.state[parameter]["step"].item() == 0
