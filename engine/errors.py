"""Errors the user can fix: reported as one clear message, not a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


class EngineError(Exception):
    """Bad input (config, data, model source, checkpoint); the message names what and where."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report an :class:`EngineError` (or a config error) as one line and exit 2, no traceback."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (EngineError, OmegaConfBaseException) as error:
        # Once on the terminal, and in the run's log file when there is one.
        record = logging.LogRecord("engine", logging.ERROR, __file__, 0, "%s", (error,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
