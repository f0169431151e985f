"""The live progress bar of a long stage, the same whichever runner does the work: the driver
counts the rows of each finished batch (in-process, or reported back by a Ray worker) and draws
rows done, rows/s and the ETA on stderr. On a terminal only: a log file gets the stage's one
summary line, not hundreds of redraws."""

from __future__ import annotations

import logging
import sys


def progress_bar(name: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:<16}", unit=" rows", unit_scale=False, leave=False,
                dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()), file=sys.stderr,
                mininterval=0.5, bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} rows "
                "[{elapsed}<{remaining}, {rate_noinv_fmt}]")


class BarSafeHandler(logging.StreamHandler):
    """Log lines on stderr that never land inside a live bar: tqdm clears the bar, writes the
    line, then draws the bar again (a worker's notice, or Ray's start in the background)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: a failed write is reported, not raised
            self.handleError(record)
