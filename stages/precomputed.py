"""Precomputed corpus vectors (`--corpus-embeddings`): vectors made elsewhere, normalised and
written as embedding shards, so the index stage treats them like its own.

Accepted: a Parquet file or folder with `id` and `embedding` columns, or a `.npy` file (loaded
without pickle, memory-mapped) with its ids in a text file beside it, one per line
(`vectors.npy` + `vectors.ids.txt`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hardneg.stages.base import GlobalStage, MapStage, Resources
from hardneg.stages.ingest import file_fingerprint
from hardneg.stages.io import ShardWriter, embedding_matrix, iter_batches, release_pages

CHUNK = 65_536


def _normalised_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)
    return pa.table({"id": pa.array(ids, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])})


class PrecomputedEmbeddings(GlobalStage):
    name = "corpus_vectors"
    version = "1"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def fingerprint_config(self) -> dict[str, Any]:
        if not hasattr(self, "_hashes"):  # hashed once: the runner asks more than once per run
            extra = self.path.with_suffix(".ids.txt")
            self._hashes = {"vectors": file_fingerprint(self.path), "ids": file_fingerprint(extra) if extra.exists() else None}
        return self._hashes

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
        rows = 0
        with ShardWriter(out_dir) as writer:
            if self.path.suffix == ".npy":
                vectors = np.load(self.path, mmap_mode="r", allow_pickle=False)
                ids_file = self.path.with_suffix(".ids.txt")
                if not ids_file.is_file():
                    raise ValueError(f"{self.path}: needs its ids in {ids_file.name}")
                with open(ids_file) as handle:
                    ids = [line.rstrip("\n") for line in handle]
                if len(ids) != len(vectors):
                    raise ValueError(f"{self.path}: {len(vectors)} vectors but {len(ids)} ids")
                for start in range(0, len(ids), CHUNK):
                    writer.write(_normalised_table(ids[start:start + CHUNK], vectors[start:start + CHUNK]))
                    release_pages(vectors)
            else:
                source = self.path if self.path.is_dir() else self.path.parent
                files = [self.path] if self.path.is_file() else None
                batches = (pa.Table.from_batches([b]) for f in files for b in pq.ParquetFile(f).iter_batches(CHUNK)) if files else iter_batches(source, CHUNK)
                for batch in batches:
                    writer.write(_normalised_table(batch.column("id").to_pylist(), embedding_matrix(batch)))
            rows = writer.rows
        return {"vectors": rows}


class PrecomputedQueryVectors(MapStage):
    """`query_embeddings`: attach vectors made elsewhere to the queries table, by query id, in
    place of the embed_queries stage (same output: the queries columns plus `embedding`)."""

    name = "query_vectors"
    version = "1"
    in_process = True  # a lookup by id: runs in the driver

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path)
        self.resources = Resources(num_cpus=1, batch_size=4096)

    def fingerprint_config(self) -> dict[str, Any]:
        if not hasattr(self, "_hashes"):  # hashed once, as PrecomputedEmbeddings does
            self._hashes = PrecomputedEmbeddings(Path(self.path)).fingerprint_config()
        return self._hashes

    def setup(self) -> None:
        path = Path(self.path)
        if path.suffix == ".npy":
            self._vectors = np.load(path, mmap_mode="r", allow_pickle=False)
            with open(path.with_suffix(".ids.txt")) as handle:
                self._row = {line.rstrip("\n"): i for i, line in enumerate(handle)}
        else:
            table = pq.read_table(path, columns=["id", "embedding"])
            self._vectors = embedding_matrix(table)
            self._row = {doc_id: i for i, doc_id in enumerate(table.column("id").to_pylist())}

    def transform(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("query_id").to_pylist()
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise ValueError(f"query_embeddings has no vector for {len(missing)} queries (e.g. {missing[0]!r})")
        table = _normalised_table(ids, self._vectors[[self._row[i] for i in ids]])
        return batch.append_column("embedding", table.column("embedding"))
