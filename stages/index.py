"""Index: gather the corpus vectors into one memory-mapped matrix in corpus order and build the
FAISS index over it.

Vectors are placed by document id at the document's row in the corpus table, so the matrix (and
the index trained from it) is the same whichever runner wrote the embedding shards, in whatever
order. Memory stays bounded: vectors stream from the embedding shards into a .npy memmap, and the
index is built from the memmap in chunks.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hardneg.stages.engines.faiss_index import IndexConfig, build_index
from hardneg.stages.base import GlobalStage
from hardneg.stages.io import DocIds
from hardneg.stages.io import IPC_BATCH_BYTES, ShardWriter, embedding_matrix, iter_batches, read_group, release_pages, shard_files, shard_groups, shard_schema


class IndexStage(GlobalStage):
    name = "index"
    version = "2"  # 2: the calibration reference top-k by numpy sgemm (index.json recall curve)

    def __init__(self, index: IndexConfig) -> None:
        self.index = index

    def fingerprint_config(self) -> dict[str, Any]:
        # Where the index runs (GPU or CPU) does not change which vectors it holds.
        return self.index.model_dump(exclude={"gpu"})

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
        parts = []
        with ShardWriter(out_dir / "ids", pa.schema([("doc_id", pa.string())])) as ids:
            for batch in iter_batches(inputs["corpus"], 100_000, columns=["doc_id"], whole=True):
                parts.append(batch.column("doc_id").combine_chunks())
                ids.write(batch)
        if not parts or sum(len(p) for p in parts) == 0:
            raise ValueError("the corpus is empty: no document survived ingest")
        row_of = DocIds(pa.concat_arrays(parts))  # ingest wrote each id once
        vectors = write_vectors(inputs["embeddings"], row_of, out_dir / "vectors.npy")
        build_index(vectors, self.index, out_dir / "faiss")
        return {"documents": len(row_of), "dim": int(vectors.shape[1])}


def embedding_dim(directory: Path) -> int:
    schema = shard_schema(shard_files(directory)[0])
    return schema.field("embedding").type.list_size


def write_vectors(embeddings: Path, row_of: DocIds, path: Path) -> np.memmap:
    dim = embedding_dim(embeddings)
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(row_of), dim))
    filled = np.zeros(len(row_of), dtype=bool)
    with open(path, "r+b", buffering=0) as file:
        for rows, values in _decoded_shards(embeddings, row_of, dim):
            known = rows >= 0  # vectors of ids outside the corpus are not needed
            if not known.all():
                rows, values = rows[known], values[known]
            if _is_run(rows):
                # Consecutive rows (vectors stored in corpus order, the usual case) are written
                # to the file: through the mapping every page cost a fault and the zeroing of a
                # new page (at 1M, 5.7 s where these writes take 0.45 s).
                _write_at(file, matrix.offset + int(rows[0]) * matrix.strides[0], values)
            else:
                matrix[rows] = values
                release_pages(matrix)  # written pages go to the file, not this process's memory
            filled[rows] = True
    if not filled.all():
        raise ValueError(f"{int((~filled).sum())} corpus documents have no embedding")
    # No msync: like every shard in the work dir, the file is whole in the page cache once written
    # (a killed process loses none of it), and the stage's manifest, written last, marks it done.
    del matrix
    return np.load(path, mmap_mode="r")


def _is_run(rows: np.ndarray) -> bool:
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool((np.diff(rows) == 1).all())


def _write_at(file, offset: int, values: np.ndarray) -> None:
    """`values`' bytes at `offset` of `file`, in writes of IPC_BATCH_BYTES (one huge write(2)
    took this VM several times as long as the same bytes in megabytes)."""
    data = memoryview(np.ascontiguousarray(values, dtype=np.float32)).cast("B")
    done = 0
    while done < len(data):  # pwrite may write less than asked
        done += os.pwrite(file.fileno(), data[done:done + IPC_BATCH_BYTES], offset + done)


def _decoded_shards(embeddings: Path, row_of: DocIds, dim: int, ahead: int = 2):
    """(corpus rows, vectors) of each record batch (row group, in Parquet) of the embedding shards,
    in file order: the next `ahead` are read in threads (Arrow releases the GIL) while the caller
    writes the current one. Decoding Parquet was the larger half of this stage's copy."""

    def decode(unit: tuple[Path, int]) -> tuple[np.ndarray, np.ndarray]:
        table = read_group(unit[0], unit[1], columns=["id", "embedding"])
        return row_of.rows(table.column("id").combine_chunks()), embedding_matrix(table, dim)

    units = iter([(f, g) for f in shard_files(embeddings) for g in range(shard_groups(f))])
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending = deque(pool.submit(decode, unit) for unit in islice(units, ahead))
        while pending:
            done = pending.popleft()
            following = next(units, None)
            if following is not None:
                pending.append(pool.submit(decode, following))
            yield done.result()
