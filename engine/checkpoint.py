"""Checkpoint files: atomic writes, the best-checkpoint contract, safe loading.

``best_acc_classify.pth`` is a plain transformers ``state_dict`` (no ``module.``,
``_orig_mod.`` or wrapper prefix, no loss weights): the seed's recipe loads it with
``model.load_state_dict(torch.load(path, weights_only=True))``. Everything needed to
use it sits beside it in ``best_acc_classify.json``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import EngineError

BEST_WEIGHTS = "best_acc_classify.pth"
BEST_INFO = "best_acc_classify.json"
PREFIXES = ("module.", "_orig_mod.")
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(EngineError):
    """A checkpoint could not be written or does not fit the model."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write through a temp file in the same folder, fsync it, rename over ``path``, fsync the folder.

    A crash or a write error (disk full) leaves the previous ``path`` untouched and no temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from error
        if isinstance(error, RuntimeError):  # torch.save on a full disk: "unexpected pos ..."
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"cannot write {path} (disk full?): {first}") from error
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False, default=str) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def save_best(run_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write the best weights, then the JSON that describes them (the JSON names the weights' step)."""
    value = info.get("metric_value")
    if value is None or not math.isfinite(float(value)):
        raise CheckpointError(f"refusing to save a best checkpoint with metric value {value!r}")
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to save a best checkpoint: weight {name!r} is not finite")
    run_dir = Path(run_dir)
    weights = atomic_write(run_dir / BEST_WEIGHTS, lambda handle: torch.save(state_dict, handle))
    atomic_write_json(run_dir / BEST_INFO, info)
    return weights


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]  # every prefix is one dotted name
        cleaned[key] = value
    return cleaned


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``state_dict`` file safely (``weights_only=True``: no pickled code can run)."""
    path = Path(path)
    state = _safe_load(path, f"checkpoint not found: {path}", "not a safe weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    return strip_prefixes(state)


def load_info(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint description not found: {path}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise naming every missing, unexpected and mis-shaped key; nothing partial is loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatches:\n    " + "\n    ".join(shapes))
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:20]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(parts))


# --- Resumable training state: <run dir>/state/step_<N>/, complete when COMPLETE exists ---

STATE_DIR = "state"
COMPLETE = "COMPLETE"
MODEL_KEY, OPTIMIZER_KEY, SCHEDULER_KEY, SCALER_KEY = "model", "optimizer", "scheduler", "scaler"
PROGRESS_FILE = "progress.json"
REPLACED = ".replaced"  # suffix of a complete state set aside while its step is saved again


def capture_rng() -> dict[str, Any]:
    """Every generator this process draws from, as tensors and plain values (weights_only-safe)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype("uint32"), numpy["position"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / STATE_DIR / f"step_{step:08d}"


def write_state_part(folder: Path, name: str, payload: Any) -> None:
    """One file of a state being written (each rank writes its own RNG file this way)."""
    atomic_write(folder / name, lambda handle: torch.save(payload, handle))


def begin_state(run_dir: Path, step: int) -> Path:
    """The temp folder a new state is written into (removed first if a crash left one)."""
    folder = Path(run_dir) / STATE_DIR / f".tmp_step_{step:08d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def commit_state(folder: Path, step: int, progress: dict[str, Any]) -> Path:
    """Write the progress record and the COMPLETE marker, rename into place, then drop older states."""
    atomic_write_json(folder / PROGRESS_FILE, progress)
    atomic_write(folder / COMPLETE, lambda handle: handle.write(b"ok\n"))
    _fsync_dir(folder)
    final = state_step_dir(folder.parent.parent, step)
    if final.exists():  # the same step saved again: the complete one steps aside, it is not removed
        aside = final.with_name(final.name + REPLACED)
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        _fsync_dir(final.parent)
    os.replace(folder, final)
    _fsync_dir(final.parent)
    for older in final.parent.iterdir():  # only now that the new state is complete
        if older != final and older.name.startswith("step_"):
            shutil.rmtree(older, ignore_errors=True)
    return final


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file() and (folder / PROGRESS_FILE).is_file() and (folder / MODEL_KEY).is_file()


def latest_state(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete state under ``run_dir/state`` and warnings for the incomplete ones skipped."""
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return None, []
    warnings = []
    # A state set aside while its step was saved again comes after that step's own state.
    saved = (p for p in root.iterdir() if p.name.startswith("step_"))
    for folder in sorted(
        saved, key=lambda p: (p.name.removesuffix(REPLACED), not p.name.endswith(REPLACED)), reverse=True
    ):
        if is_complete(folder):
            try:
                load_info(folder / PROGRESS_FILE)
                return folder, warnings
            except CheckpointError as error:
                warnings.append(f"skipping {folder}: {error}")
        else:
            warnings.append(f"skipping incomplete state {folder}")
    return None, warnings


def load_state_part(folder: Path, name: str) -> Any:
    path = Path(folder) / name
    return _safe_load(path, f"{path}: missing from the saved state", "not a safe, complete state file")


def _safe_load(path: Path, missing: str, unsafe: str) -> Any:
    """``torch.load(..., weights_only=True)``: tensors and plain values only, never code."""
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: {unsafe} ({type(error).__name__}: {error})") from None


LOCK_FILE = ".lock"


class RunDirLock:
    """An exclusive lock on a run directory for as long as a run writes in it: a second run there
    fails at once naming the holder. ``flock`` dies with its process, so a killed run's lock is
    never stale. Holding it, the run clears the temp files a killed writer left behind."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir, self.enabled, self.fd = Path(run_dir), enabled, None

    def __enter__(self) -> RunDirLock:
        import fcntl

        if not self.enabled:
            return self
        path = self.run_dir / LOCK_FILE
        while self.fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            except OSError as error:
                raise CheckpointError(f"cannot write in the run directory {self.run_dir}: {error.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(
                    f"the run directory {self.run_dir} is in use by another run ({holder}); "
                    "choose another hydra.run.dir (or output_dir), or wait for it to end"
                ) from None
            try:  # the holder before us removes the file as it lets go: lock the file that is there
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        remove_stale_temp_files(self.run_dir)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # while still held: see __enter__
            os.close(self.fd)  # releases the flock
            self.fd = None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """The ``.<name>.*.tmp`` files and ``state/.tmp_step_*`` folders a killed writer left (call it holding
    the run directory's lock, when no writer can be at work)."""
    stale = [p for p in Path(run_dir).glob(".*.tmp") if p.is_file()]
    state = Path(run_dir) / STATE_DIR
    if state.is_dir():
        stale += [p for p in state.glob(".tmp_step_*") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, info)`` for a run directory, a ``.pth`` file or its ``.json``."""
    path = Path(path)
    if path.is_dir():
        weights, info = path / BEST_WEIGHTS, path / BEST_INFO
    elif path.suffix == ".json":
        weights, info = path.with_suffix(".pth"), path
    else:
        weights, info = path, path.with_suffix(".json")
    if not weights.is_file():
        raise CheckpointError(f"checkpoint not found: {weights}")
    if not info.is_file():
        raise CheckpointError(f"{weights}: the description {info.name} is missing beside it")
    return weights, info
