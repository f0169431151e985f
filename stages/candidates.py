"""Candidates: mine each query's candidate negatives from every configured source (dense FAISS
search, BM25), drop the query's masked documents (its judged positives), and fuse the sources by
reciprocal rank fusion. Every candidate keeps each source's rank and score.

Dense scores are recomputed exactly (float64 dot products of the stored vectors) for every
candidate and positive, whichever index found them: an approximate or batched search then only
decides *which* documents are candidates, and every score and order is independent of how the
queries were batched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from stages.base import MapStage, Resources
from stages.io import read_table


class CandidatesStage(MapStage):
    name = "candidates"
    version = "1"
    stateful = True

    def __init__(
        self,
        *,
        miners: list[str],
        range_max: int,
        rrf_k: int,
        index_dir: Path,
        index_config,
        bm25_dir: Path | None = None,
        bm25_config=None,
        threads: int = 1,
        batch_size: int = 256,
        max_workers: int | None = None,
    ) -> None:
        super().__init__()
        self.miners = list(miners)
        self.range_max = range_max
        self.rrf_k = rrf_k
        self.index_dir = str(index_dir)
        self.index_config = index_config
        self.bm25_dir = str(bm25_dir) if bm25_dir else None
        self.bm25_config = bm25_config
        self.resources = Resources(num_cpus=threads, batch_size=batch_size, max_workers=max_workers)

    def fingerprint_config(self) -> dict[str, Any]:
        # The index and BM25 files are upstream stages: their fingerprints are chained in.
        return {"miners": self.miners, "range_max": self.range_max, "rrf_k": self.rrf_k}

    def setup(self) -> None:
        from stages.ann_index import AnnIndex

        index_dir = Path(self.index_dir)
        self._vectors = np.load(index_dir / "vectors.npy", mmap_mode="r")
        self._doc_ids = np.array(read_table(index_dir / "ids").column("doc_id").to_pylist(), dtype=object)
        self._row_of = {doc_id: row for row, doc_id in enumerate(self._doc_ids)}
        self._ann = AnnIndex.load(index_dir / "faiss", self.index_config) if "dense" in self.miners else None
        self._bm25 = None
        if "bm25" in self.miners:
            from stages.bm25_miner import BM25Index

            self._bm25 = BM25Index.load(Path(self.bm25_dir), self.bm25_config)

    def _exact(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0, dtype=np.float32)
        return (np.asarray(self._vectors[np.sort(rows)], dtype=np.float64) @ query.astype(np.float64))[
            np.argsort(np.argsort(rows))
        ].astype(np.float32)

    def transform(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        queries = batch.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        queries = np.ascontiguousarray(queries.reshape(n, -1), dtype=np.float32)
        masks = [set(m) for m in batch.column("mask_ids").to_pylist()]
        texts = batch.column("text").to_pylist()
        positives = batch.column("positive_ids").to_pylist()
        extra = max((len(m) for m in masks), default=0)
        k = self.range_max + extra  # enough to leave range_max after removing masked ids

        found: list[dict[str, dict[str, tuple[int, float]]]] = [dict() for _ in range(n)]
        if self._ann is not None:
            _, rows = self._ann.search(queries, min(k, len(self._doc_ids)))
            for i in range(n):
                valid = rows[i][rows[i] >= 0]
                scores = self._exact(queries[i], valid)
                ids = self._doc_ids[valid]
                order = sorted(range(len(valid)), key=lambda j: (-scores[j], ids[j]))
                ranked = [(ids[j], float(scores[j])) for j in order if ids[j] not in masks[i]]
                found[i]["dense"] = {d: (r, s) for r, (d, s) in enumerate(ranked[: self.range_max], start=1)}
        if self._bm25 is not None:
            ids_lists, score_lists = self._bm25.search(texts, k)
            for i in range(n):
                ranked = [(d, s) for d, s in zip(ids_lists[i], score_lists[i]) if d not in masks[i]]
                found[i]["bm25"] = {d: (r, s) for r, (d, s) in enumerate(ranked[: self.range_max], start=1)}

        columns: dict[str, list] = {name: [] for name in schemas.CANDIDATES.names if name not in batch.column_names}
        for i in range(n):
            sources = found[i]
            fused = {}
            for per_source in sources.values():
                for doc_id, (rank, _) in per_source.items():
                    fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (self.rrf_k + rank)
            candidate_ids = sorted(fused, key=lambda d: (-fused[d], d))
            cand_rows = np.array([self._row_of[d] for d in candidate_ids], dtype=np.int64)
            pos_rows = np.array([self._row_of[d] for d in positives[i]], dtype=np.int64)
            dense = self._exact(queries[i], cand_rows)
            columns["positive_dense_scores"].append(self._exact(queries[i], pos_rows).tolist())
            columns["candidate_ids"].append(candidate_ids)
            columns["sources"].append([[s for s in self.miners if d in sources.get(s, {})] for d in candidate_ids])
            columns["dense_scores"].append(dense.tolist())
            columns["dense_ranks"].append([sources.get("dense", {}).get(d, (None,))[0] for d in candidate_ids])
            if self._bm25 is not None:
                bm25_known = sources["bm25"]
                missing = [d for d in candidate_ids if d not in bm25_known]
                extra_scores = dict(zip(missing, self._bm25.score(texts[i], missing))) if missing else {}
                columns["bm25_scores"].append(
                    [bm25_known[d][1] if d in bm25_known else extra_scores[d] for d in candidate_ids]
                )
                columns["bm25_ranks"].append([bm25_known.get(d, (None,))[0] for d in candidate_ids])
                columns["positive_bm25_scores"].append(self._bm25.score(texts[i], positives[i]))
            else:
                columns["bm25_scores"].append(None)
                columns["bm25_ranks"].append(None)
                columns["positive_bm25_scores"].append(None)
            columns["fused_ranks"].append(list(range(1, len(candidate_ids) + 1)))
        out = batch.drop_columns(["embedding"])
        for name in schemas.CANDIDATES.names[len(schemas.QUERIES) :]:
            out = out.append_column(name, pa.array(columns[name], type=schemas.CANDIDATES.field(name).type))
        return out
