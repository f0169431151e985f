"""In-process execution of a map stage: stream Parquet batches through it, write shards."""

from __future__ import annotations

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
        total = count_rows(input_dir)
        try:
            with ShardWriter(out_dir) as writer, progress_bar(stage.name, total, self.progress) as bar:
                for batch in iter_batches(input_dir, stage.resources.batch_size):
                    batch_delay_for_tests(stage.name)
                    writer.write(stage(batch))
                    bar.update(batch.num_rows)
        finally:
            stage.release()  # its index and memory maps are not needed by the stages after it
        return writer.rows

    def close(self) -> None:
        pass
