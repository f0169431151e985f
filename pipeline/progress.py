"""The live progress bar of a long stage, the same whichever runner does the work: the driver
counts the rows of each finished batch (in-process, or reported back by a Ray worker) and draws
rows done, rows/s and the ETA on stderr. On a terminal only: a log file gets the stage's one
summary line, not hundreds of redraws."""

from __future__ import annotations

import sys


def progress_bar(name: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:<16}", unit=" rows", unit_scale=False, leave=False,
                dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()), file=sys.stderr,
                mininterval=0.5, bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} rows "
                "[{elapsed}<{remaining}, {rate_noinv_fmt}]")
