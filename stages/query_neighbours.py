"""Query neighbours: for each query, the known positives of its k nearest other queries.

The `neighbour_positive` filter drops a candidate that is a known positive of one of its query's
k nearest queries (by the cosine of their vectors): two queries that ask nearly the same thing
share relevant documents, and the dataset's own labels for one are evidence for the other. The
neighbours are found once per run, over every query, by the same FAISS index the corpus gets
(exact below `index.exact_threshold` queries, approximate above), so a run of any size costs one
search of the queries against themselves.

Writes one table, `neighbours`: (query_id, doc_id, rank) for every positive of each query's
j-th nearest other query (rank j, 1..k; a document a query's nearer neighbours already gave keeps
its lowest rank). A query's own positives are never listed for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg.stages.base import GlobalStage
from hardneg.stages.engines.faiss_index import AnnIndex, IndexConfig, build_index
from hardneg.stages.io import ShardWriter, embedding_matrix, iter_batches

SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("rank", pa.int32())])


class QueryNeighboursStage(GlobalStage):
    name = "query_neighbours"
    version = "1"

    def __init__(self, k: int, index: IndexConfig) -> None:
        self.k = int(k)
        self.index = index

    def fingerprint_config(self) -> dict[str, Any]:
        return {"k": self.k, "index": self.index.model_dump(exclude={"gpu"})}

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
        ids, positives, vectors = [], [], []
        for batch in iter_batches(inputs["queries"], 65_536, columns=["query_id", "positive_ids", "embedding"], whole=True):
            ids.append(batch.column("query_id").combine_chunks())
            positives.append(batch.column("positive_ids").combine_chunks())
            vectors.append(embedding_matrix(batch))
        query_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
        positive_ids = pa.concat_arrays(positives) if positives else pa.array([], pa.list_(pa.string()))
        n = len(query_ids)
        with ShardWriter(out_dir / "neighbours", SCHEMA) as writer:
            if n > 1:
                neighbours = self._nearest(np.concatenate(vectors).astype(np.float32), out_dir / "faiss")
                writer.write(_positives_of_neighbours(query_ids, positive_ids, neighbours))
        return {"queries": n, "k": self.k}

    def _nearest(self, vectors: np.ndarray, index_dir: Path) -> np.ndarray:
        """Each query's k nearest *other* queries (rows; -1 where fewer exist), nearest first."""
        build_index(vectors, self.index, index_dir)
        try:
            _, found = AnnIndex.load(index_dir, self.index).search(vectors, min(self.k + 1, len(vectors)))
        finally:
            shutil.rmtree(index_dir, ignore_errors=True)  # used once: only the table is kept
        found = np.asarray(found, dtype=np.int64)
        others = np.where(found == np.arange(len(vectors))[:, None], -1, found)
        # Each row's others in search order, self removed: a stable sort moves the -1s last.
        order = np.argsort(others < 0, axis=1, kind="stable")
        return np.take_along_axis(others, order, axis=1)[:, : self.k]


def _positives_of_neighbours(query_ids: pa.Array, positive_ids: pa.Array, neighbours: np.ndarray) -> pa.Table:
    """(query_id, doc_id, rank) rows: each query's j-th neighbour's positives at rank j, the lowest
    rank of a document kept, the query's own positives left out."""
    n, k = neighbours.shape
    query = np.repeat(np.arange(n), k)
    neighbour = neighbours.reshape(-1)
    rank = np.tile(np.arange(1, k + 1), n)
    valid = neighbour >= 0
    query, neighbour, rank = query[valid], neighbour[valid], rank[valid]
    counts = pc.list_value_length(positive_ids).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(counts) - counts
    per = counts[neighbour]
    flat = np.repeat(starts[neighbour] - np.cumsum(per) + per, per) + np.arange(int(per.sum()))
    table = pa.table({
        "query_id": query_ids.take(pa.array(np.repeat(query, per))),
        "doc_id": pc.list_flatten(positive_ids).take(pa.array(flat, pa.int64())),
        "rank": pa.array(np.repeat(rank, per), pa.int32()),
    })
    own = pa.table({"query_id": query_ids.take(pa.array(np.repeat(np.arange(n), counts))),
                    "doc_id": pc.list_flatten(positive_ids), "own": pa.array(np.ones(int(counts.sum()), bool))})
    table = table.join(own, ["query_id", "doc_id"], join_type="left outer")
    table = table.filter(pc.is_null(table.column("own"))).drop_columns(["own"])
    best = table.group_by(["query_id", "doc_id"], use_threads=False).aggregate([("rank", "min")])
    best = pa.table({"query_id": best["query_id"], "doc_id": best["doc_id"], "rank": best["rank_min"]})
    return best.sort_by([("query_id", "ascending"), ("doc_id", "ascending")]).cast(SCHEMA)


def read_neighbours(directory: Path) -> pa.Table:
    """The stage's table, whole (a few rows per query)."""
    from hardneg.stages.io import read_table

    return read_table(Path(directory) / "neighbours", SCHEMA)
