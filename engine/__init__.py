"""A training engine for fine-tuning transformer encoders on text classification.

``from engine import load_classifier`` loads a saved run for inference; ``engine.loop.train``
runs the training loop. Heavy imports happen on first use.
"""

from typing import Any

__all__ = ["load_classifier", "train"]


def __getattr__(name: str) -> Any:
    if name == "load_classifier":
        from engine.predict import load_classifier

        return load_classifier
    if name == "train":
        from engine.loop import train

        return train
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
