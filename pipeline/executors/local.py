"""In-process execution of a map stage: stream its input shards' batches through it, write shards.

A stage that declares `local_batches` > 1 computes that many batches at once in a thread pool
(each thread on one core); the results are written in input order, so the shards are the same
as one batch at a time.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hardneg.pipeline.progress import progress_bar
from hardneg.pipeline.executors import batch_delay_for_tests
from hardneg.stages.base import MapStage
from hardneg.stages.io import ShardWriter, count_rows, iter_batches


class LocalExecutor:
    name = "local"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def prepare(self, stages: list[MapStage]) -> None:
        """Nothing to start ahead: the in-process runner loads a model when its stage runs."""

    def run_map(self, stage: MapStage, input_dir: Path, out_dir: Path) -> int:
        try:
            return compute_in_process(stage, input_dir, out_dir, self.progress)
        finally:
            stage.release()  # its index and memory maps are not needed by the stages after it

    def close(self) -> None:
        pass


def compute_in_process(stage: MapStage, input_dir: Path, out_dir: Path, progress: bool, total: int | None = None) -> int:
    """Every batch of `input_dir` through the stage in this process, written as shards in input
    order; the rows written. `total`: the input's rows, where the caller has counted them."""
    total = count_rows(input_dir) if total is None else total
    with ShardWriter(out_dir) as writer, progress_bar(stage.name, total, progress) as bar:
        for rows, result in _results(stage, iter_batches(input_dir, stage.resources.batch_size)):
            writer.write(result)
            bar.update(rows)
    return writer.rows


def _results(stage: MapStage, batches):
    """(input rows, result) of every batch in input order, `stage.local_batches` batches computed
    at a time (one: in this thread)."""

    def compute(batch):
        batch_delay_for_tests(stage.name)
        return batch.num_rows, stage(batch)

    workers = stage.local_batches
    if workers == 1:
        yield from map(compute, batches)
        return
    stage.ensure_setup()  # once, before the threads share it
    pool = ThreadPoolExecutor(workers, thread_name_prefix=f"hardneg-{stage.name}", initializer=stage.enter_batch_thread)
    pending: deque = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(compute, batch))
            if len(pending) > workers:  # one batch queued beyond those running
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # On an error or Ctrl-C: nothing new starts; the batches already running finish first.
        pool.shutdown(wait=True, cancel_futures=True)
