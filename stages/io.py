"""Reading and writing a stage's Parquet shards; shared by stages and runners."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def parquet_files(directory: Path) -> list[Path]:
    # Sorted names make every reader see the rows in the same order.
    return sorted(Path(directory).glob("*.parquet"))


def iter_batches(directory: Path, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    for file in parquet_files(directory):
        reader = pq.ParquetFile(file)
        for batch in reader.iter_batches(batch_size=batch_size, columns=columns):
            yield pa.Table.from_batches([batch])


def read_table(directory: Path, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
    files = parquet_files(directory)
    if not files:
        if schema is None:
            raise FileNotFoundError(f"no Parquet shards in {directory}")
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)


def count_rows(directory: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(directory))


class ShardWriter:
    """Write tables into numbered Parquet shards of at most `rows_per_shard` rows."""

    def __init__(self, directory: Path, schema: pa.Schema | None = None, rows_per_shard: int = 100_000, prefix: str = "part") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self._shards = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        table = table.cast(self.schema) if table.schema != self.schema else table
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                path = self.directory / f"{self.prefix}-{self._shards:05d}.parquet"
                self._writer = pq.ParquetWriter(path, self.schema)
                self._shards += 1
                self._rows_in_shard = 0
            take = min(table.num_rows - offset, self.rows_per_shard - self._rows_in_shard)
            self._writer.write_table(table.slice(offset, take))
            offset += take
            self._rows_in_shard += take
            self.rows += take
            if self._rows_in_shard >= self.rows_per_shard:
                self._writer.close()
                self._writer = None

    def write_rows(self, rows: list[dict]) -> None:
        if rows:
            self.write(pa.Table.from_pylist(rows, schema=self.schema))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._shards == 0 and self.schema is not None:
            # An empty output is still a readable table with the right columns.
            pq.write_table(self.schema.empty_table(), self.directory / f"{self.prefix}-00000.parquet")
            self._shards = 1

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
