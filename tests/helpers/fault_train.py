"""Run train.py's Hydra entry point with a fault injected from outside the engine.

    python tests/helpers/fault_train.py --exit-after-step K [hydra overrides...]

``--exit-after-step K`` ends the process with ``os._exit(1)`` (no clean-up, no state
saved) right after the K-th optimizer step: what a preemption or OOM kill does.
"""

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    args = sys.argv[1:]
    exit_after = None
    if args and args[0] == "--exit-after-step":
        exit_after = int(args[1])
        args = args[2:]
    if exit_after is not None:
        original = torch.optim.AdamW.step
        calls = {"n": 0}

        def step(self, *a, **k):
            result = original(self, *a, **k)
            calls["n"] += 1
            if calls["n"] == exit_after:
                os._exit(1)
            return result

        torch.optim.AdamW.step = step
    sys.argv = [str(ROOT / "train.py"), *args]
    import runpy

    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
