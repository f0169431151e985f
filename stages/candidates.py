"""Candidates: mine each query's candidate negatives from every configured source (dense FAISS
search, BM25), drop the query's masked documents (its judged positives), and fuse the sources by
reciprocal rank fusion. Every candidate keeps each source's rank and score.

Dense scores are recomputed exactly (float64 dot products of the stored vectors) for every
candidate and positive, whichever index found them: an approximate or batched search then only
decides *which* documents are candidates, and every score and order is independent of how the
queries were batched.

Two per-query facts the filters and the consistency check read are computed here from the stored
vectors too: each positive's dense rank among the *whole* corpus (`positive_ranks`: 1 + the number
of documents scoring higher; exact from the search results when the positive is among them, else
from a chunked exact scan of the vectors when the corpus is small enough to be searched exactly
(`index.exact_threshold`), else the lower bound "search depth + 1"), and each candidate's highest
document-document cosine to the query's positives (`positive_similarity`, for near-duplicates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hardneg import schemas
from hardneg.stages.base import MapStage, Resources
from hardneg.stages.io import VectorFile, read_table


SCAN_CHUNK = 16_384  # corpus rows per block of the exact positive-rank scan


class _BatchVectors:
    """The stored vectors of the rows one batch touches, read once and looked up by row."""

    def __init__(self, source: VectorFile, rows: np.ndarray) -> None:
        self._rows = np.unique(rows)
        self._matrix = source.take(self._rows)

    def _get(self, rows: np.ndarray) -> np.ndarray:
        return self._matrix[np.searchsorted(self._rows, rows)].astype(np.float64)

    def exact(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float64 dot products of the query with the rows' vectors, as float32."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.float32)
        return (self._get(rows) @ query.astype(np.float64)).astype(np.float32)

    def cosines(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        """len(rows) x len(others) cosines of the (normalised) document vectors."""
        if len(rows) == 0 or len(others) == 0:
            return np.zeros((len(rows), len(others)), dtype=np.float64)
        return self._get(rows) @ self._get(others).T


class CandidatesStage(MapStage):
    name = "candidates"
    version = "2"
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
        score_bm25: bool = False,
    ) -> None:
        super().__init__()
        self.miners = list(miners)
        self.range_max = range_max
        self.rrf_k = rrf_k
        self.index_dir = str(index_dir)
        self.index_config = index_config
        self.bm25_dir = str(bm25_dir) if bm25_dir else None
        self.bm25_config = bm25_config
        # Score every candidate with BM25 even when BM25 is not a miner (a filter reads it).
        self.score_bm25 = bool(score_bm25) or "bm25" in self.miners
        self.resources = Resources(num_cpus=threads, batch_size=batch_size, max_workers=max_workers)

    def fingerprint_config(self) -> dict[str, Any]:
        # The index and BM25 files are upstream stages: their fingerprints are chained in.
        return {"miners": self.miners, "range_max": self.range_max, "rrf_k": self.rrf_k, "score_bm25": self.score_bm25}

    def setup(self) -> None:
        from hardneg.stages.ann_index import AnnIndex

        index_dir = Path(self.index_dir)
        self._vectors = VectorFile(index_dir / "vectors.npy")
        self._doc_ids = np.array(read_table(index_dir / "ids").column("doc_id").to_pylist(), dtype=object)
        self._scan = len(self._doc_ids) <= int(getattr(self.index_config, "exact_threshold", 0))
        self._row_of = {doc_id: row for row, doc_id in enumerate(self._doc_ids)}
        # The dense search also ranks the positives: loaded without the dense miner too when the
        # corpus is too large for an exact scan.
        need_ann = "dense" in self.miners or not self._scan
        self._ann = AnnIndex.load(index_dir / "faiss", self.index_config) if need_ann else None
        self._bm25 = None
        if self.score_bm25:
            from hardneg.stages.bm25_miner import BM25Index

            self._bm25 = BM25Index.load(Path(self.bm25_dir), self.bm25_config)

    def _scan_ranks(self, queries: np.ndarray, wanted: dict[int, list[tuple[int, int, float]]]) -> dict[tuple[int, int], int]:
        """Exact corpus ranks by a chunked scan: `wanted[i]` lists (slot, row, score) of query i's
        positives; returns 1 + the number of *other* documents scoring strictly higher."""
        if not wanted:
            return {}
        qs = sorted(wanted)
        q = np.asarray(queries[qs], dtype=np.float64)
        higher = {(i, slot): 0 for i in qs for slot, _, _ in wanted[i]}
        for start in range(0, len(self._doc_ids), SCAN_CHUNK):
            stop = min(start + SCAN_CHUNK, len(self._doc_ids))
            scores = self._vectors.rows(start, stop).astype(np.float64) @ q.T  # chunk x queries
            for column, i in enumerate(qs):
                s = scores[:, column]
                for slot, row, score in wanted[i]:
                    count = int(np.count_nonzero(s > score))
                    if start <= row < stop and s[row - start] > score:
                        count -= 1  # the positive itself never outranks itself
                    higher[(i, slot)] += count
        return {key: value + 1 for key, value in higher.items()}

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
        pos_rows = [np.array([self._row_of[d] for d in positives[i]], dtype=np.int64) for i in range(n)]
        ann_rows = np.zeros((n, 0), dtype=np.int64)
        depth = 0
        if self._ann is not None:
            depth = min(k, len(self._doc_ids))
            _, ann_rows = self._ann.search(queries, depth)
        bm25_ids: list[list[str]] = []
        bm25_scores: list[list[float]] = []
        if self._bm25 is not None and "bm25" in self.miners:
            bm25_ids, bm25_scores = self._bm25.search(texts, k, n_threads=int(self.resources.num_cpus))
        # Every stored vector the batch needs (positives, both miners' hits), read once.
        vectors = _BatchVectors(self._vectors, np.concatenate(
            [*pos_rows, ann_rows[ann_rows >= 0], np.array([self._row_of[d] for ids in bm25_ids for d in ids], dtype=np.int64)]))
        pos_scores = [vectors.exact(queries[i], pos_rows[i]) for i in range(n)]
        pos_ranks: list[list[int | None]] = [[None] * len(pos_rows[i]) for i in range(n)]
        if self._ann is not None:
            for i in range(n):
                valid = ann_rows[i][ann_rows[i] >= 0]
                scores = vectors.exact(queries[i], valid)
                for slot, (row, score) in enumerate(zip(pos_rows[i], pos_scores[i])):
                    if row in valid:
                        pos_ranks[i][slot] = 1 + int(np.count_nonzero((scores > score) & (valid != row)))
                if "dense" not in self.miners:
                    continue
                ids = self._doc_ids[valid]
                order = sorted(range(len(valid)), key=lambda j: (-scores[j], ids[j]))
                ranked = [(ids[j], float(scores[j])) for j in order if ids[j] not in masks[i]]
                found[i]["dense"] = {d: (r, s) for r, (d, s) in enumerate(ranked[: self.range_max], start=1)}
        for i in range(len(bm25_ids)):
            ranked = [(d, s) for d, s in zip(bm25_ids[i], bm25_scores[i]) if d not in masks[i]]
            found[i]["bm25"] = {d: (r, s) for r, (d, s) in enumerate(ranked[: self.range_max], start=1)}

        missing = {i: [(slot, int(pos_rows[i][slot]), float(pos_scores[i][slot])) for slot, r in enumerate(pos_ranks[i]) if r is None]
                   for i in range(n)}
        missing = {i: v for i, v in missing.items() if v}
        if self._scan:
            for (i, slot), rank in self._scan_ranks(queries, missing).items():
                pos_ranks[i][slot] = rank
        else:
            for i, slots in missing.items():
                for slot, _, _ in slots:
                    pos_ranks[i][slot] = depth + 1  # not in the searched top `depth`: a lower bound

        columns: dict[str, list] = {name: [] for name in schemas.CANDIDATES.names if name not in batch.column_names}
        for i in range(n):
            sources = found[i]
            fused = {}
            for per_source in sources.values():
                for doc_id, (rank, _) in per_source.items():
                    fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (self.rrf_k + rank)
            candidate_ids = sorted(fused, key=lambda d: (-fused[d], d))
            cand_rows = np.array([self._row_of[d] for d in candidate_ids], dtype=np.int64)
            dense = vectors.exact(queries[i], cand_rows)
            columns["positive_dense_scores"].append(pos_scores[i].tolist())
            columns["positive_ranks"].append(pos_ranks[i])
            similarity = vectors.cosines(cand_rows, pos_rows[i])
            columns["positive_similarity"].append(
                similarity.max(axis=1).astype(np.float32).tolist() if similarity.shape[1] else [None] * len(candidate_ids)
            )
            columns["candidate_ids"].append(candidate_ids)
            columns["sources"].append([[s for s in self.miners if d in sources.get(s, {})] for d in candidate_ids])
            columns["dense_scores"].append(dense.tolist())
            columns["dense_ranks"].append([sources.get("dense", {}).get(d, (None,))[0] for d in candidate_ids])
            if self._bm25 is not None:
                bm25_known = sources.get("bm25", {})
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
