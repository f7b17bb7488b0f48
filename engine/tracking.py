"""What a run leaves behind for people to read: the log file and JSONL metric files.

Only the main process writes; the others get a tracker that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from engine.errors import EngineError

log = logging.getLogger("engine.tracking")

LOG_FILE = "train.log"
EVAL_METRICS = "metrics.jsonl"  # one line per evaluation
TRAIN_METRICS = "train_steps.jsonl"  # one line per logging step

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def setup_logging(run_dir: Path, is_main_process: bool) -> None:
    """Make ``train.log`` in the run dir receive the engine's log on the main process.

    Under ``python train.py`` Hydra already logs to ``<run dir>/train.log``; when
    ``train(cfg)`` is called directly (tests, notebooks) this adds that file handler.
    Other processes log warnings and errors only, and to no file.
    """
    root = logging.getLogger()
    target = (run_dir / LOG_FILE).resolve()
    if not is_main_process:
        import datasets

        datasets.disable_progress_bars()  # one set of bars: rank 0's
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        logging.getLogger("engine").setLevel(logging.WARNING)
        return
    logging.getLogger("engine").setLevel(logging.INFO)
    has_file = any(
        isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target for h in root.handlers
    )
    if not has_file:
        handler = logging.FileHandler(target, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._engine_owned = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(_FORMAT))
        stream._engine_owned = True  # type: ignore[attr-defined]
        root.addHandler(stream)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def close_logging() -> None:
    """Remove the handlers :func:`setup_logging` added (so repeated runs in one process stay apart)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_engine_owned", False):
            root.removeHandler(handler)
            handler.close()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlLogger:
    """``log(metrics, step)`` appends one JSON line to ``path``; ``close()`` closes the file."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8") if enabled else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._handle is None:
            return
        payload = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._handle.write(json.dumps(payload) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TensorBoardLogger:
    """Scalars under ``<run dir>/tensorboard``, named ``<split>/<metric>``."""

    def __init__(self, folder: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Weights & Biases; ``WANDB_MODE=offline`` keeps everything local."""

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise EngineError(
                "logger includes wandb but the wandb package is not installed (pip install wandb)"
            ) from None
        self.run = wandb.init(project=project, dir=str(run_dir), config=config, reinit=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


LOGGERS = ("jsonl", "tensorboard", "wandb")


class Tracker:
    """Fans each record out to the configured loggers; does nothing off the main process.

    JSONL keeps two files: ``train_steps.jsonl`` (one line per logging step) and
    ``metrics.jsonl`` (one line per evaluation). TensorBoard and W&B get
    ``train/<name>`` and ``eval/<name>`` scalars.
    """

    def __init__(
        self,
        run_dir: Path,
        loggers: list[str],
        enabled: bool,
        config: dict[str, Any],
        project: str = "engine",
        resume_step: int | None = None,
    ) -> None:
        unknown = [name for name in loggers if name not in LOGGERS]
        if unknown:
            raise EngineError(f"logger: unknown {unknown}; choose from {list(LOGGERS)}")
        self.enabled = enabled
        self.streams: dict[str, JsonlLogger] = {}
        self.scalars: list[Any] = []
        if not enabled:
            return
        # Lines written after the state was saved are written again by the resumed run; a run that
        # starts from step 0 starts the files anew (an old run's lines would read as this one's).
        keep_to = -1 if resume_step is None else resume_step
        for name in (TRAIN_METRICS, EVAL_METRICS):
            if (run_dir / name).is_file():
                keep = [r for r in read_jsonl(run_dir / name) if r.get("step", 0) <= keep_to]
                (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in keep))
        per_class = run_dir / PER_CLASS
        if per_class.is_file():
            lines = per_class.read_text().splitlines(keepends=True)
            per_class.write_text("".join(lines[:1] + [x for x in lines[1:] if _csv_step(x) <= keep_to]))
        if "jsonl" in loggers:
            self.streams = {"train": JsonlLogger(run_dir / TRAIN_METRICS), "eval": JsonlLogger(run_dir / EVAL_METRICS)}
        if "tensorboard" in loggers:
            self.scalars.append(TensorBoardLogger(run_dir / "tensorboard", resume_step))
        if "wandb" in loggers:
            self.scalars.append(WandbLogger(run_dir, project, config))

    def log(self, split: str, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        stream = self.streams.get("train" if split == "train" else "eval")
        if stream is not None:
            stream.log(metrics if split in ("train", "eval") else {"split": split, **metrics}, step)
        for logger in self.scalars:
            logger.log({f"{split}/{k}": v for k, v in metrics.items()}, step)

    def close(self) -> None:
        for logger in [*self.streams.values(), *self.scalars]:
            logger.close()
        self.streams, self.scalars = {}, []


def _csv_step(line: str) -> int:
    """The step a ``per_class.csv`` line starts with; a torn line counts as after every step."""
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return 1 << 62


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (a kill mid-write) is dropped with a warning."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if any(rest.strip() for rest in lines[number:]):
                raise EngineError(f"{path}:{number}:{error.colno}: not a JSON line ({error.msg})") from None
            log.warning("%s:%d: dropping a torn last line (a write was cut off)", path, number)
    return records


PER_CLASS = "per_class.csv"


def append_per_class(run_dir: Path, report: list[dict[str, Any]], step: int) -> Path:
    """One block of rows per evaluation: step, label, precision, recall, f1, support."""
    import csv

    path = run_dir / PER_CLASS
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "label", "precision", "recall", "f1", "support"])
        if new:
            writer.writeheader()
        for row in report:
            writer.writerow({"step": step, **row})
    return path


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        "run summary:",
        f"  best {summary['best_metric']} = {summary['best_value']:.4f} at step {summary['best_step']}"
        f" of {summary['steps']}",
    ]
    if summary.get("test"):
        test = " ".join(f"{k}={v:.4f}" for k, v in summary["test"].items() if isinstance(v, float))
        lines.append(f"  test (best checkpoint): {test}")
    startup = summary.get("startup_seconds")
    lines += [
        f"  wall time {summary['wall_seconds']:.1f} s | training {summary['train_samples_per_s']:.1f} samples/s, "
        f"{summary['train_tokens_per_s']:.0f} tokens/s on {summary['processes']} process(es)"
        + (f" | first step {startup:.1f} s after start" if startup is not None else ""),
        f"  files in {summary['run_dir']}: {', '.join(summary['files'])}",
    ]
    return "\n".join(lines)


class LineProgress:
    """The progress bar's place where stderr is no terminal (a log file, CI): one plain line
    every ``interval`` seconds and at the end, instead of carriage-return redraws."""

    def __init__(self, total: int, initial: int = 0, interval: float = 30.0, clock: Any = None) -> None:
        import time

        self.total, self.n, self.interval = total, initial, interval
        self.postfix = ""
        self._clock = clock or time.monotonic
        self._started = self._last = self._clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._clock() - self._last >= self.interval:
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _write(self) -> None:
        self._last = now = self._clock()
        elapsed = now - self._started
        line = f"train: {self.n}/{self.total} steps ({100 * self.n / max(self.total, 1):.0f}%) {elapsed:.0f} s"
        print(line + (f" | {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._write()


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm on a terminal, :class:`LineProgress` elsewhere, and a silent one when not ``enabled``."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial)
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=0.5, disable=not enabled)
