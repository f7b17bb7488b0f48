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
    """``log(metrics, step)`` appends one JSON line; ``close()`` closes the file."""

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
