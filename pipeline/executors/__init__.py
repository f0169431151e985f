"""Where map stages run: in the driver process (local) or on a Ray cluster (ray, the only module that imports ray)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def hook_seconds_for_tests(variable: str, stage_name: str, default: float) -> float | None:
    """Tests only: the seconds `variable=<stage>[:seconds]` asks of `stage_name`, or None when the
    variable is unset or names another stage. Costs one environment lookup."""
    spec = os.environ.get(variable)
    if not spec:
        return None
    name, _, seconds = spec.partition(":")
    return float(seconds or default) if name == stage_name else None


def batch_delay_for_tests(stage_name: str) -> None:
    """Tests only: `HARDNEG_TEST_BATCH_DELAY=<stage>:<seconds>` makes every worker of that stage
    (in-process or on Ray) touch `$HARDNEG_TEST_MARK_DIR/<stage>-<pid>` (when set) and sleep
    before each batch, so a test can kill a worker in the middle of a batch
    (tests/test_determinism.py) or a run while it embeds, however fast the machine embeds
    (tests/test_resume.py). Unset in normal use."""
    seconds = hook_seconds_for_tests("HARDNEG_TEST_BATCH_DELAY", stage_name, 0)
    if seconds is None:
        return
    if os.environ.get("HARDNEG_TEST_MARK_DIR"):
        Path(os.environ["HARDNEG_TEST_MARK_DIR"], f"{stage_name}-{os.getpid()}").touch()
    time.sleep(seconds)
