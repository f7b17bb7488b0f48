"""Shared fixtures: offline environment, real configs composed with tmp_path outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Every test runs offline: nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, also in the processes they start,
    # so that OpenMP threads do not spin against each other (set before torch is imported).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from engine.config import CONFIG_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenized")


def compose_cfg(output_dir: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    """The real config with overrides, writing to ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(
            config_name="config", overrides=[f"output_dir={output_dir}", f"data.cache_dir={cache_dir}", *overrides]
        )


@pytest.fixture
def make_cfg(tmp_path, token_cache):
    """Compose the real config with overrides; outputs go to tmp_path/run."""

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_cfg(output_dir or tmp_path / "run", token_cache, *overrides)

    return _make


# A fast tiny run: 2-layer random BERT, MRPC slices.
TINY = (
    "model=tiny",
    "trainer.progress=false",
    "data.max_train_samples=64",
    "data.max_eval_samples=40",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=16",
    "trainer.epochs=1",
    "trainer.log_every=1",
    # fp32: several tests compare runs to 1e-4 (accumulation, resume, backends); bf16 has its own.
    "trainer.mixed_precision=no",
)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def accelerate_launch(port: int, processes: int = 2) -> list[str]:
    """``accelerate launch`` for ``processes`` gloo processes on the CPU (the venv's launcher first)."""
    import shutil

    local = ROOT / ".venv" / "bin" / "accelerate"
    launcher = str(local) if local.exists() else shutil.which("accelerate")
    assert launcher, "accelerate's launcher is not installed"
    return [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]


class PicklePayload:
    """Unpickling this runs ``touch target``: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def assert_same_training(run: Path, reference: Path, evaluations: int, weights_atol: float = 1e-5) -> None:
    """Two runs of one config that differ in a lever meant to change no result: the same number of
    evaluations with the same dev losses (1e-4) and accuracies, and the same best-checkpoint keys
    and weights (``weights_atol``)."""

    import torch

    def records(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    got, expected = records(run), records(reference)
    assert len(got) == len(expected) == evaluations
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["accuracy"] == b["accuracy"]
    saved = torch.load(run / "best_acc_classify.pth")
    reference_weights = torch.load(reference / "best_acc_classify.pth")
    assert saved.keys() == reference_weights.keys()
    for key in saved:
        assert torch.allclose(saved[key], reference_weights[key], atol=weights_atol), key


def speedup_on_and_off(make_cfg, tmp_path: Path, name: str, *overrides: str) -> tuple[Path, Path]:
    """Two runs with ``overrides``: ``speedups=off`` with only ``speedups.<name>=true``, and
    ``speedups=off``; returns their run dirs, having checked that each log names what it applied."""
    from engine.loop import train

    on, off = tmp_path / name, tmp_path / "off"
    train(make_cfg(*overrides, "speedups=off", f"speedups.{name}=true", output_dir=on))
    train(make_cfg(*overrides, "speedups=off", output_dir=off))
    assert f"speed-ups: {name}\n" in (on / "train.log").read_text()
    assert "speed-ups: none\n" in (off / "train.log").read_text()
    return on, off
