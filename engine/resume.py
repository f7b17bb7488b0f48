"""Resuming and interrupting a run: what a state holds, when it fits, and the stop signal.

The files themselves (atomic writes, the COMPLETE marker, safe loading) are
``engine.checkpoint``'s; this module decides what goes into them and checks that a
state fits the run that wants to continue from it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint
from engine.checkpoint import CheckpointError

log = logging.getLogger("engine.resume")

# What a resumed run must share with the run that saved the state: everything that changes the
# result (a section name stands for each of its keys). The data files' contents are compared too.
MUST_MATCH = (
    *(f"model.{key}" for key in "source name tokenizer pretrained config_overrides dropout reinit_layers".split()),
    *(
        f"data.{key}"
        for key in "name subset train_file validation_file format quoting column_names header text_column "
        "text_pair_column label_column label_delimiter label_names num_labels problem_type eval_split max_length "
        "max_train_samples max_eval_samples group_by_length".split()
    ),
    *(
        f"trainer.{key}"
        for key in "batch_size grad_accum_steps epochs max_steps max_grad_norm eval_every metric_for_best "
        "greater_is_better mixed_precision ema_decay early_stopping_patience early_stopping_threshold".split()
    ),
    "optim",
    "loss",
    "seed",
)
DATA_FILES = ("data.train_file", "data.validation_file")
EMA_KEY = "ema"  # the moving average of the weights (trainer.ema_decay): its AveragedModel state_dict


@dataclass
class Progress:
    """Where the loop stands; everything else in a state is tensors."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    batches_in_epoch: int = 0  # micro-batches this process consumed in ``epoch`` (skipped steps too)
    global_step: int = 0
    best_value: float | None = None
    best_step: int = -1
    last_eval_step: int = -1
    evals_without_improvement: int = 0  # early stopping's count (trainer.early_stopping_patience)
    early_stopped: bool = False
    nonfinite_steps: int = 0
    window_steps: int = 0
    window_samples: int = 0
    train_samples: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _leaves(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {leaf: v for k, sub in value.items() for leaf, v in _leaves(f"{key}.{k}", sub).items()}
    return {key: value}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    differences = []
    for key in MUST_MATCH:
        before, now = _leaves(key, _get(saved, key)), _leaves(key, _get(current, key))
        for leaf in sorted(before.keys() | now.keys()):
            if before.get(leaf) != now.get(leaf):
                differences.append(f"{leaf}: saved {before.get(leaf)!r}, now {now.get(leaf)!r}")
    return differences


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprints(config: dict[str, Any]) -> dict[str, str | None]:
    """The SHA-256 of each local data file the run trains and chooses its best on (same path, other
    contents: another run)."""
    prints: dict[str, str | None] = {}
    for key in DATA_FILES:
        path = _get(config, key)
        if path and Path(path).is_file():
            stat = Path(path).stat()
            prints[key] = _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        else:
            prints[key] = None
    return prints


def find_state(resume: str, run_dir: Path) -> Path | None:
    """The state folder to continue from; ``None`` for ``auto`` with nothing saved yet."""
    path = Path(run_dir if resume == "auto" else resume)
    if resume != "auto" and (path.name.startswith("step_") or (path / checkpoint.COMPLETE).exists()):
        if not checkpoint.is_complete(path):
            raise CheckpointError(f"{path}: the state is incomplete (no {checkpoint.COMPLETE} marker or files missing)")
        return path
    if not path.is_dir() and resume != "auto":
        raise CheckpointError(f"resume={resume}: no such run directory or state folder")
    folder, warnings = checkpoint.latest_state(path)
    if folder is None and resume != "auto":
        raise CheckpointError(
            f"resume={resume}: no complete state under {path / checkpoint.STATE_DIR}"
            + (f" ({'; '.join(warnings)})" if warnings else "")
        )
    for warning in warnings:
        log.warning("%s", warning)
    return folder


def save(
    run_dir: Path,
    backend: Any,
    progress: Progress,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    extra_tensors: dict[str, Any],
    config: dict[str, Any],
    averaged: torch.nn.Module | None = None,
) -> Path | None:
    """Write a complete state for every rank; the previous state goes only once this one is complete.
    ``model`` is the prepared model (under FSDP every rank gathers its shards, and writes its own part
    of the optimizer state). ``averaged``: the moving average of the weights (``trainer.ema_decay``)."""
    weights = backend.state_dict(model)
    folder = checkpoint.begin_state(run_dir, progress.global_step) if backend.is_main_process else None
    folder = Path(backend.broadcast_object(str(folder) if folder else None))
    backend.wait_for_everyone()
    # Every rank's own generators: dropout differs per rank.
    checkpoint.write_state_part(folder, f"rng_rank{backend.process_index}", checkpoint.capture_rng())
    if backend.is_main_process or backend.sharded:  # under FSDP each rank writes its own shard
        checkpoint.write_state_part(folder, optimizer_part(backend), optimizer.state_dict())
    final = None
    if backend.is_main_process:
        checkpoint.write_state_part(folder, checkpoint.MODEL_KEY, weights)
        checkpoint.write_state_part(folder, checkpoint.SCHEDULER_KEY, scheduler.state_dict())
        checkpoint.write_state_part(folder, "extra", extra_tensors)
        if averaged is not None:
            averaged_state = {k: v.detach().cpu() for k, v in averaged.state_dict().items()}
            checkpoint.write_state_part(folder, EMA_KEY, averaged_state)
    backend.wait_for_everyone()
    if backend.is_main_process:
        record = {"progress": asdict(progress), "world_size": backend.num_processes, "config": config}
        record["data_sha256"] = data_fingerprints(config)
        final = checkpoint.commit_state(folder, progress.global_step, record)
    backend.wait_for_everyone()
    return final


def optimizer_part(backend: Any) -> str:
    """The optimizer state's file: one for all ranks, or each rank's own shard under FSDP."""
    return f"{checkpoint.OPTIMIZER_KEY}_rank{backend.process_index}" if backend.sharded else checkpoint.OPTIMIZER_KEY


def check(folder: Path, backend: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Refuse a state whose run differs in what matters (before any work or any write)."""
    meta = checkpoint.load_info(folder / checkpoint.PROGRESS_FILE)
    differences = config_differences(meta.get("config", {}), config)
    saved_prints = meta.get("data_sha256", {})
    for key, now in data_fingerprints(config).items():
        if key in saved_prints and saved_prints[key] != now:
            differences.append(f"{key}: the file's contents changed (SHA-256 {saved_prints.get(key)} -> {now})")
    if meta.get("world_size") != backend.num_processes:
        differences.append(f"world size: saved {meta.get('world_size')}, now {backend.num_processes}")
    if differences:
        raise CheckpointError(f"cannot resume from {folder}: the run differs in\n  " + "\n  ".join(differences))
    return meta


def load(folder: Path, backend: Any, config: dict[str, Any]) -> tuple[Progress, dict[str, Any]]:
    """Read a state, refusing it when the run differs in what matters."""
    meta = check(folder, backend, config)
    parts = {
        name: checkpoint.load_state_part(folder, name)
        for name in (checkpoint.MODEL_KEY, checkpoint.SCHEDULER_KEY, "extra")
    }
    parts[checkpoint.OPTIMIZER_KEY] = checkpoint.load_state_part(folder, optimizer_part(backend))
    parts["rng"] = checkpoint.load_state_part(folder, f"rng_rank{backend.process_index}")
    if _get(meta.get("config", {}), "trainer.ema_decay") is not None:
        parts[EMA_KEY] = checkpoint.load_state_part(folder, EMA_KEY)
    return Progress(**meta["progress"]), parts


class StopSignal:
    """SIGTERM / SIGINT ask the loop to save and stop at the next step boundary; a second signal waits."""

    CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning("received %s: saving a resumable state at the end of this step", signal.Signals(signum).name)
        self.received = self.received or signum

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in self.CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def exit_code(self) -> int:
        return self.CODES.get(self.received, 1) if self.received else 0


def restore(
    folder: Path,
    backend: Any,
    config: dict[str, Any],
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    averaged: torch.nn.Module | None = None,
) -> tuple[Progress, dict[str, Any]]:
    """Load a state into the fresh (transformers) model, optimizer, schedule and moving average of the
    weights (``averaged``, where ``trainer.ema_decay`` is set); returns the progress and the
    state's other parts (``extra`` tensors, this rank's ``rng``: restore that last, right before
    the first step, so the resumed run draws the same dropout masks as the uninterrupted one)."""
    progress, parts = load(folder, backend, config)
    if not backend.sharded:  # FSDP's full-state load checks keys itself; its parameters are shards
        checkpoint.check_state_dict(backend.unwrap_model(model).hf_model, parts[checkpoint.MODEL_KEY], folder)
    backend.load_state_dict(model, parts[checkpoint.MODEL_KEY])
    optimizer.load_state_dict(parts[checkpoint.OPTIMIZER_KEY])
    scheduler.load_state_dict(parts[checkpoint.SCHEDULER_KEY])
    if averaged is not None:
        averaged.load_state_dict(parts[EMA_KEY])
    log.info("resuming from %s: epoch %d, step %d", folder, progress.epoch, progress.global_step)
    return progress, parts
