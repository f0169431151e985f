"""Where map stages run: in the driver process (local) or on a Ray cluster (ray, the only module that imports ray)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def batch_delay_for_tests(stage_name: str) -> None:
    """Tests only: `HARDNEG_TEST_BATCH_DELAY=<stage>:<seconds>` makes every worker of that stage
    (in-process or on Ray) touch `$HARDNEG_TEST_MARK_DIR/<stage>-<pid>` (when set) and sleep
    before each batch, so a test can kill a worker in the middle of a batch
    (tests/test_determinism.py) or a run while it embeds, however fast the machine embeds
    (tests/test_resume.py). Unset in normal use; costs one environment lookup per batch."""
    spec = os.environ.get("HARDNEG_TEST_BATCH_DELAY")
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name == stage_name:
        if os.environ.get("HARDNEG_TEST_MARK_DIR"):
            Path(os.environ["HARDNEG_TEST_MARK_DIR"], f"{name}-{os.getpid()}").touch()
        time.sleep(float(seconds or 0))
