"""Errors the user can fix: reported as one clear message, not a traceback."""


class EngineError(Exception):
    """Bad input (config, data, model source, checkpoint); the message names what and where."""
