"""Shared fixtures: offline environment, real configs composed with tmp_path outputs."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

# Every test runs offline: nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


# A test that builds a native library itself.
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

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


def assert_same_training(run: Path, reference: Path, evaluations: int) -> None:
    """Two runs of one config that differ in a lever meant to change no result: the same number of
    evaluations with the same dev losses (1e-4) and accuracies, and the same best-checkpoint keys
    and weights (1e-5)."""
    import json

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
        assert torch.allclose(saved[key], reference_weights[key], atol=1e-5), key


@pytest.fixture(autouse=True)
def _torch_masks_between_tests():
    """A run enables the compiled dropout masks, softmax and GELU for its process; each test starts without them."""
    from engine import native_gelu, native_masks, native_softmax

    native_masks.use_native_masks(False, False)
    native_softmax.use_native_softmax(False)
    native_gelu.use_native_gelu(False)
    yield
    native_masks.use_native_masks(False, False)
    native_softmax.use_native_softmax(False)
    native_gelu.use_native_gelu(False)


def native_on_and_off(make_cfg, tmp_path, setting: str, logged: str, *extra: str) -> dict[str, list[float]]:
    """A tiny fast-dropout training run (more overrides: ``extra``) with ``trainer.<setting>`` null (the
    default) and false: the step losses of each; asserts that only the null run's log has ``logged``."""
    from engine.loop import train

    runs = {}
    for value in ("null", "false"):
        out = tmp_path / value
        train(make_cfg(*TINY, "trainer.fast_dropout=true", *extra, f"trainer.{setting}={value}", output_dir=out))
        steps = [json.loads(line) for line in (out / "train_steps.jsonl").read_text().splitlines()]
        runs[value] = [step["loss"] for step in steps]
        assert (logged in (out / "train.log").read_text()) == (value == "null")
    return runs


def native_library(module):
    """A native library module's (``SOURCE``, ``FLAGS``, ``load``) built and loaded library; the test is
    skipped without a C compiler."""
    import shutil

    from engine import native_masks

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    return module.load(native_masks.build(source=module.SOURCE, flags=module.FLAGS))


def assert_no_compiler_handled(monkeypatch, tmp_path, caplog, use, setting: str, instead: str) -> None:
    """With no C compiler, ``use(True)`` (a native library's setting true) is an error naming
    ``setting``; ``use(None)`` returns (None, None) with a warning saying what the run does ``instead``."""
    from engine.errors import EngineError

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(EngineError, match=f"{setting}: could not run the C compiler"):
        use(True)
    assert use(None) == (None, None)
    assert instead in caplog.text


def assert_broken_build_refused(module, old: str, new: str, folder: Path, match: str) -> None:
    """A native library module (``SOURCE``, ``FLAGS``, ``load``): a build of its C file with ``old``
    replaced by ``new`` (the headers it may include copied beside it) refuses to load, ``match``ing."""
    import shutil

    from engine import native_masks
    from engine.errors import EngineError

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    text = module.SOURCE.read_text()
    assert old in text, f"{module.SOURCE.name} no longer has {old!r}"
    for header in module.SOURCE.parent.glob("*.h"):
        shutil.copy(header, folder)
    broken = folder / module.SOURCE.name
    broken.write_text(text.replace(old, new))
    path = native_masks.build(folder / "cache", source=broken, flags=module.FLAGS)
    with pytest.raises(EngineError, match=match):
        module.load(path)
