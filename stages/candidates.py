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

Everything works on whole batches of queries with numpy and pyarrow: candidates are flat arrays
of (query, corpus row) pairs, fused, ranked and scored by sorts and gathers, and turned into
Arrow list columns by offsets, never a Python object per candidate or per document. Document ids
become corpus rows on the way in and ids again (an Arrow `take`) on the way out; string order,
the tie-break everywhere, is a precomputed rank per row (Arrow's byte order of UTF-8, which is
Python's string order).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg import schemas
from hardneg.stages.base import MapStage, Resources
from hardneg.stages.io import DocIds, VectorFile, id_bytes, read_table

log = logging.getLogger("hardneg")

SCAN_CHUNK = 16_384  # corpus rows per block of the exact positive-rank scan
GATHER_BUDGET = 1 << 18  # float64 vector elements gathered at once (2 MB, cache-sized) for exact scores
SCAN_COLUMNS = 256  # positives compared against one scanned block at a time
_batch_thread = threading.local()  # `threads`: set in the in-process runner's batch threads


class _BatchVectors:
    """The stored vectors of the rows one batch touches, read once, and the exact scores of the
    batch's (query, row) pairs: each distinct pair scored once, whichever source found it."""

    def __init__(self, source: VectorFile, rows: np.ndarray) -> None:
        self._rows = sorted_unique(rows[rows >= 0])
        self._matrix = source.take(self._rows, out=_thread_scratch(len(self._rows), source.shape[1]))
        # Where each of the batch's rows sits in the matrix: a per-thread table over the corpus,
        # looked up directly (a binary search per lookup cost 2.4 s of a 1M run). Entries of
        # rows outside this batch are stale and never read.
        self._slot = _thread_slots(source.shape[0])
        self._slot[self._rows] = np.arange(len(self._rows), dtype=np.int32)

    def _get(self, rows: np.ndarray) -> np.ndarray:
        """float64 vectors of `rows` (any shape, all of them this batch's rows or < 0); rows < 0
        give zero vectors."""
        out = np.empty((*rows.shape, self._matrix.shape[1]), dtype=np.float64)
        if len(self._rows) == 0:
            out.fill(0.0)
            return out
        widen = _compiled_widen()
        if widen is not None:  # one pass: gather and convert (float32 -> float64 is exact)
            widen(self._matrix, self._slot, rows.reshape(-1), out.reshape(-1, self._matrix.shape[1]))
            return out
        out[...] = self._matrix[self._slot[np.maximum(rows, 0)]]
        out[rows < 0] = 0.0
        return out

    def _chunks(self, n: int, width: int):
        # Small enough that a chunk's float64 copies stay in cache between gather and product.
        step = max(1, GATHER_BUDGET // max(1, width * self._matrix.shape[1]))
        return ((i, min(i + step, n)) for i in range(0, n, step))

    def exact_and_max_cosine(self, queries: np.ndarray, grid: np.ndarray,
                             positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 dot products of query i with the vectors of grid[i] (rows, -1 = none), as
        float32 (-inf where there is no row), and per grid[i, j] the highest cosine of that row's
        vector to the vectors of positives[i] (float64, then float32; NaN where query i has no
        positive), from one gather of the grid's vectors. One stacked matrix-vector product per
        chunk of queries."""
        dots = np.full(grid.shape, -np.inf, dtype=np.float32)
        best_all = np.full(grid.shape, np.nan, dtype=np.float32)
        if grid.shape[1] == 0:
            return dots, best_all
        q = queries.astype(np.float64)
        for a, b in self._chunks(len(grid), grid.shape[1] + positives.shape[1]):
            vectors = self._get(grid[a:b])
            dots[a:b] = np.matmul(vectors, q[a:b, :, None])[:, :, 0].astype(np.float32)
            if positives.shape[1]:
                best_all[a:b] = _max_cosine(vectors, self._get(positives[a:b]), positives[a:b] < 0)
        dots[grid < 0] = -np.inf
        return dots, best_all

    def max_cosine(self, grid: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Per grid[i, j], the highest cosine of that row's vector to the vectors of others[i]
        (float32; NaN where query i has none): exact_and_max_cosine without the query."""
        best_all = np.full(grid.shape, np.nan, dtype=np.float32)
        if grid.shape[1] == 0 or others.shape[1] == 0:
            return best_all
        for a, b in self._chunks(len(grid), grid.shape[1] + others.shape[1]):
            best_all[a:b] = _max_cosine(self._get(grid[a:b]), self._get(others[a:b]), others[a:b] < 0)
        return best_all


def _max_cosine(vectors: np.ndarray, others: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Per query (first axis) and row, the highest dot product with the query's `others` that are
    not `missing` (float32; NaN where all are)."""
    cos = np.matmul(vectors, others.transpose(0, 2, 1))
    cos[np.broadcast_to(missing[:, None, :], cos.shape)] = -np.inf
    best = cos.max(axis=2)
    best[missing.all(axis=1)] = np.nan
    return best.astype(np.float32)


def _thread_scratch(n: int, dim: int) -> np.ndarray:
    """An (n, dim) float32 array for a batch's stored vectors, reused by the thread's next batch.
    A new array per batch was fresh memory, which the kernel zeroes each time: in a 1M run (391
    batches of ~50k rows) the gathers took 21.2-22.5 s that way, 14.3-16.0 s into this one."""
    held = getattr(_batch_thread, "scratch", None)
    if held is None or held.shape[1] != dim:
        held = _batch_thread.scratch = np.empty((n, dim), np.float32)
    elif len(held) < n:  # grown with room, so that a slightly larger next batch fits too
        held = _batch_thread.scratch = np.empty((max(n, int(1.25 * len(held))), dim), np.float32)
    return held[:n]


def _thread_slots(n_docs: int) -> np.ndarray:
    """An int32 table with an entry per corpus row, reused by the thread's next batch."""
    held = getattr(_batch_thread, "slots", None)
    if held is None or len(held) != n_docs:
        held = _batch_thread.slots = np.zeros(n_docs, np.int32)
    return held


@functools.lru_cache(maxsize=1)
def _compiled_widen():
    """A compiled gather of a batch's float32 rows into float64, or None without numba."""
    if importlib.util.find_spec("numba") is None:
        return None
    from hardneg.stages.engines.compiled import njit

    @njit
    def widen(matrix, slot, rows, out):
        for i in range(rows.shape[0]):
            if rows[i] < 0:
                out[i, :] = 0.0
                continue
            at = slot[rows[i]]
            for j in range(matrix.shape[1]):
                out[i, j] = matrix[at, j]

    return widen


def _query_key(q: np.ndarray, n: int) -> np.ndarray:
    """A batch's query indices as the narrowest sort key: np.lexsort radix-sorts 16-bit keys,
    where int64 keys take a comparison sort (a batch's two fusion sorts: 9.9 -> 6.5 ms)."""
    return q.astype(np.int16) if n <= np.iinfo(np.int16).max else q


def _unique_first_inverse(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(key, return_index=True, return_inverse=True)[1:] by one stable sort: the index of
    each distinct key's first occurrence (in key order) and each element's distinct-key slot."""
    order = np.argsort(key, kind="stable")
    new = _run_starts(key[order])
    inverse = np.empty(len(key), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return order[new], inverse


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique of a 1-D integer array by one sort: numpy 2's np.unique took 4x as long."""
    values = np.sort(values)
    return values[_run_starts(values)]


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """True where a sorted array's value differs from the one before (and at index 0)."""
    starts = np.empty(len(ordered), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    return starts


class _PairScores:
    """The exact dense score (and highest cosine to the query's positives) of every distinct
    (query, row) pair of a batch, computed once: the positives, the dense hits and the BM25 hits
    share one gather of their vectors, and each source's scores are looked up by pair."""

    def __init__(self, vectors: _BatchVectors, queries: np.ndarray, n_docs: int, pos_grid: np.ndarray,
                 pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self._n_docs = n_docs
        q = np.concatenate([p[0] for p in pairs])
        rows = np.concatenate([p[1] for p in pairs])
        keep = rows >= 0
        self._keys = sorted_unique(q[keep] * n_docs + rows[keep])
        q, rows = np.divmod(self._keys, n_docs)
        grid = _grid(q, rows, len(queries))
        dots, cosines = vectors.exact_and_max_cosine(queries, grid, pos_grid)
        inside = grid >= 0  # row-major: the keys' order
        self._dots, self._cosines = dots[inside], cosines[inside]

    def _at(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._keys, q * self._n_docs + np.maximum(rows, 0))

    def dots(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float32 exact scores of the pairs (any shape); -inf where rows < 0."""
        if len(self._keys) == 0:
            return np.full(rows.shape, -np.inf, dtype=np.float32)
        out = self._dots[np.minimum(self._at(q, rows), len(self._keys) - 1)]
        return np.where(rows >= 0, out, np.float32(-np.inf))

    def dots_and_cosines(self, q: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`dots` and the highest cosines to the positives of pairs that were all scored (rows >= 0),
        by one lookup."""
        if len(rows) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        at = self._at(q, rows)
        return self._dots[at], self._cosines[at]


def _grid(group: np.ndarray, values: np.ndarray, n: int, fill: int = -1) -> np.ndarray:
    """Ragged values (sorted by `group`, a query index) as an n x max-length matrix."""
    counts = np.bincount(group, minlength=n) if len(group) else np.zeros(n, dtype=np.int64)
    out = np.full((n, int(counts.max(initial=0))), fill, dtype=values.dtype)
    if len(group):
        out[group, _positions(group, counts)] = values
    return out


def _positions(group: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of `group` (sorted)."""
    starts = np.cumsum(counts) - counts
    return np.arange(len(group)) - starts[group]


def _first_k(group: np.ndarray, k: int, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """The first k entries of every query (group sorted), with their 1-based ranks."""
    counts = np.bincount(group) if len(group) else np.zeros(0, dtype=np.int64)
    position = _positions(group, counts) if len(group) else np.zeros(0, dtype=np.int64)
    keep = position < k
    return (group[keep], position[keep] + 1, *(c[keep] for c in columns))


def _list_array(counts: np.ndarray, values: pa.Array) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(query index, value) of every element of a list column, in order."""
    array = column.combine_chunks()
    return pc.list_parent_indices(array).to_numpy().astype(np.int64), pc.list_flatten(array)


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
        similarity_top: int | None = None,
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
        # Each candidate's cosine to its query's first `similarity_top` candidates (a filter reads it).
        self.similarity_top = int(similarity_top) if similarity_top else None
        # A Ray actor sees only the GPUs it requests: request the one the index will search on.
        self.search_device = search_device(Path(index_dir) / "faiss", index_config)
        self.resources = Resources(num_cpus=threads, num_gpus=1.0 if self.search_device == "gpu" else 0.0,
                                   batch_size=batch_size, max_workers=max_workers)
        # In-process on CPU, `threads` batches side by side on one core each: a batch's vector
        # reads, exact scores and columns run on one core, so its own threads idle most of it.
        self.local_batches = max(1, int(threads)) if self.search_device == "cpu" else 1
        log.info("candidates: the index searches on %s", self.search_device)

    def fingerprint_config(self) -> dict[str, Any]:
        # The index and BM25 files are upstream stages: their fingerprints are chained in.
        config = {"miners": self.miners, "range_max": self.range_max, "rrf_k": self.rrf_k, "score_bm25": self.score_bm25}
        return {**config, "similarity_top": self.similarity_top} if self.similarity_top else config

    def setup(self) -> None:
        from hardneg.stages.engines.faiss_index import AnnIndex

        index_dir = Path(self.index_dir)
        self._vectors = VectorFile(index_dir / "vectors.npy")
        self._ids = DocIds(read_table(index_dir / "ids").column("doc_id"))
        self._scan = len(self._ids) <= int(getattr(self.index_config, "exact_threshold", 0))
        # The dense search also ranks the positives: loaded without the dense miner too when the
        # corpus is too large for an exact scan.
        need_ann = "dense" in self.miners or not self._scan
        self._ann = AnnIndex.load(index_dir / "faiss", self.index_config) if need_ann else None
        if self._ann is not None:
            log.info("candidates: searching %s", self._ann.description)
        self._bm25 = None
        self._bm25_rows = None  # BM25 row -> index row, None when both list the corpus alike
        if self.score_bm25:
            from hardneg.stages.engines.bm25 import BM25Index

            # Memory-mapped: the workers of one machine share the matrix's pages.
            self._bm25 = BM25Index.load(Path(self.bm25_dir), self.bm25_config, mmap=True)
            bm25_ids = self._bm25.id_array
            if not bm25_ids.equals(self._ids.array):
                self._bm25_rows = self._ids.rows(bm25_ids)

    def enter_batch_thread(self) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # OpenMP's thread count is per calling thread
        _batch_thread.threads = 1

    def transform(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        threads = getattr(_batch_thread, "threads", int(self.resources.num_cpus))
        queries = batch.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        queries = np.ascontiguousarray(queries.reshape(n, -1), dtype=np.float32)
        pos_q, pos_ids = _flat(batch.column("positive_ids"))
        pos_rows = self._ids.rows(pos_ids)
        if (pos_rows < 0).any():
            raise KeyError(f"positive {pos_ids[int(np.flatnonzero(pos_rows < 0)[0])]} is not in the index")
        mask_keys, extra = self._masks(batch.column("mask_ids"))
        k = self.range_max + extra  # enough to leave range_max after removing masked ids
        tokens = self._bm25.prepare(batch.column("text").to_pylist()) if self._bm25 is not None else None

        ann_rows = np.zeros((n, 0), dtype=np.int64)
        depth = 0
        if self._ann is not None:
            depth = min(k, len(self._ids))
            _, ann_rows = self._ann.search(queries, depth)
        hits = (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float64),)
        if self._bm25 is not None and "bm25" in self.miners:
            hits = self._bm25.search_rows(tokens, k, n_threads=threads)
            if self._bm25_rows is not None:
                hits = (hits[0], self._bm25_rows[hits[1]], hits[2])
        # Every stored vector the batch needs (positives, both miners' hits), read once.
        vectors = _BatchVectors(self._vectors, np.concatenate([pos_rows, ann_rows.ravel(), hits[1]]))
        pos_grid = _grid(pos_q, pos_rows, n)
        ann_q = np.broadcast_to(np.arange(n)[:, None], ann_rows.shape)
        exact = _PairScores(vectors, queries, len(self._ids), pos_grid,
                            [(pos_q, pos_rows), (ann_q.ravel(), ann_rows.ravel()), (hits[0], hits[1])])
        pos_scores = exact.dots(pos_q, pos_rows)
        ann_scores = exact.dots(ann_q, ann_rows)
        pos_ranks = self._positive_ranks(queries, ann_rows, ann_scores, pos_q, pos_rows, pos_scores, depth)

        sources = []
        if self._ann is not None and "dense" in self.miners:
            sources.append(("dense", self._dense_source(ann_rows, ann_scores, mask_keys)))
        if "bm25" in self.miners and self._bm25 is not None:
            q, rows, scores = hits
            keep = ~_masked(q, rows, mask_keys, len(self._ids))
            sources.append(("bm25", _first_k(q[keep], self.range_max, rows[keep], scores[keep])))
        cand = self._fuse(sources, n)
        columns = self._columns(batch, exact, tokens, cand, pos_q, pos_rows, pos_scores, pos_ranks)
        columns["top_similarity"] = self._top_similarity(vectors, cand, n)
        out = batch.drop_columns(["embedding"])
        for name in schemas.CANDIDATES.names[len(schemas.QUERIES):]:
            out = out.append_column(name, columns[name].cast(schemas.CANDIDATES.field(name).type))
        return out

    def _masks(self, column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
        """Sorted (query * N + row) keys of every query's masked documents, and the largest number
        of distinct masked ids of one query (ids outside the corpus count too)."""
        q, ids = _flat(column)
        if len(q) == 0:
            return np.zeros(0, np.int64), 0
        values = id_bytes(ids)
        order = np.lexsort((values, q))
        q_sorted, v_sorted = q[order], values[order]
        new = np.r_[True, (q_sorted[1:] != q_sorted[:-1]) | (v_sorted[1:] != v_sorted[:-1])]
        extra = int(np.bincount(q_sorted[new]).max())
        rows = self._ids.rows(ids)
        known = rows >= 0
        return sorted_unique(q[known] * len(self._ids) + rows[known]), extra

    def _dense_source(self, rows: np.ndarray, scores: np.ndarray, mask_keys: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each query's dense hits by exact score desc, then doc id; masked ids dropped; first
        range_max: (query, rank, row, score)."""
        valid = rows >= 0
        q = np.broadcast_to(np.arange(len(rows))[:, None], rows.shape)[valid]
        r, s = rows[valid], scores[valid]
        order = np.lexsort((self._ids.rank[r], -s, _query_key(q, len(rows))))
        q, r, s = q[order], r[order], s[order]
        keep = ~_masked(q, r, mask_keys, len(self._ids))
        return _first_k(q[keep], self.range_max, r[keep], s[keep])

    def _fuse(self, sources: list[tuple[str, tuple[np.ndarray, ...]]], n: int) -> dict[str, np.ndarray]:
        """Reciprocal rank fusion of the sources' (query, rank, row, score) lists: every candidate
        once per query, ordered by fused score desc, then doc id."""
        q = np.concatenate([s[0] for _, s in sources] + [np.zeros(0, np.int64)])
        rank = np.concatenate([s[1] for _, s in sources] + [np.zeros(0, np.int64)])
        row = np.concatenate([s[2] for _, s in sources] + [np.zeros(0, np.int64)])
        src = np.concatenate([np.full(len(s[0]), i) for i, (_, s) in enumerate(sources)] + [np.zeros(0, np.int64)])
        score = np.concatenate([np.asarray(s[3], np.float64) for _, s in sources] + [np.zeros(0)])
        key = q * len(self._ids) + row
        first, inverse = _unique_first_inverse(key)
        # Sources added in their order from 0.0, as sum order decides the last bit.
        fused = np.zeros(len(first))
        for i in range(len(sources)):
            at = src == i
            np.add.at(fused, inverse[at], 1.0 / (self.rrf_k + rank[at]).astype(np.float64))
        out = {"q": q[first], "row": row[first], "fused": fused}
        for i, (name, _) in enumerate(sources):
            at = src == i
            found = np.zeros(len(first), dtype=bool)
            found[inverse[at]] = True
            ranks = np.zeros(len(first), dtype=np.int64)
            ranks[inverse[at]] = rank[at]
            scores = np.zeros(len(first))
            scores[inverse[at]] = score[at]
            out.update({f"{name}_found": found, f"{name}_rank": ranks, f"{name}_score": scores})
        order = np.lexsort((self._ids.rank[out["row"]], -fused, _query_key(out["q"], n)))
        out = {key_: value[order] for key_, value in out.items()}
        out["counts"] = np.bincount(out["q"], minlength=n)
        return out

    def _positive_ranks(self, queries: np.ndarray, ann_rows: np.ndarray, ann_scores: np.ndarray, pos_q: np.ndarray,
                        pos_rows: np.ndarray, pos_scores: np.ndarray, depth: int) -> np.ndarray:
        """Each positive's dense corpus rank: from the search results when it is among them,
        else from the exact scan (small corpora), else the lower bound depth + 1."""
        ranks = np.zeros(len(pos_q), dtype=np.int64)
        found = np.zeros(len(pos_q), dtype=bool)
        if self._ann is not None and len(pos_q):
            rows, scores = ann_rows[pos_q], ann_scores[pos_q]
            self_ = rows == pos_rows[:, None]
            found = self_.any(axis=1)
            higher = (scores > pos_scores[:, None]) & ~self_ & (rows >= 0)
            ranks = 1 + higher.sum(axis=1)
        missing = np.flatnonzero(~found)
        if len(missing) and self._scan:
            ranks[missing] = self._scan_ranks(queries, pos_q[missing], pos_rows[missing], pos_scores[missing])
        elif len(missing):
            ranks[missing] = depth + 1  # not in the searched top `depth`: a lower bound
        return ranks

    def _scan_ranks(self, queries: np.ndarray, q: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Exact corpus ranks by a chunked scan: 1 + the number of *other* documents scoring
        strictly higher than each (query q, positive row) pair's score."""
        qs = np.unique(q)
        column = np.searchsorted(qs, q)
        matrix = np.asarray(queries[qs], dtype=np.float64)
        threshold = scores.astype(np.float64)
        higher = np.zeros(len(q), dtype=np.int64)
        for start in range(0, len(self._ids), SCAN_CHUNK):
            stop = min(start + SCAN_CHUNK, len(self._ids))
            block = self._vectors.rows(start, stop).astype(np.float64) @ matrix.T  # chunk x queries
            for c0 in range(0, len(q), SCAN_COLUMNS):
                c1 = min(c0 + SCAN_COLUMNS, len(q))
                higher[c0:c1] += (block[:, column[c0:c1]] > threshold[c0:c1]).sum(axis=0)
            inside = np.flatnonzero((rows >= start) & (rows < stop))
            # The positive itself never outranks itself.
            higher[inside] -= block[rows[inside] - start, column[inside]] > threshold[inside]
        return higher + 1

    def _columns(self, batch: pa.Table, exact: _PairScores, tokens, cand: dict, pos_q: np.ndarray,
                 pos_rows: np.ndarray, pos_scores: np.ndarray, pos_ranks: np.ndarray) -> dict[str, pa.Array]:
        n, counts = batch.num_rows, cand["counts"]
        pos_counts = np.bincount(pos_q, minlength=n) if len(pos_q) else np.zeros(n, dtype=np.int64)
        dense, similarity = exact.dots_and_cosines(cand["q"], cand["row"])
        ints, floats = pa.int64(), pa.float32()
        columns = {
            "positive_dense_scores": _list_array(pos_counts, pa.array(pos_scores, floats)),
            "positive_ranks": _list_array(pos_counts, pa.array(pos_ranks, ints)),
            "candidate_ids": _list_array(counts, self._ids.take(cand["row"])),
            "sources": self._sources_column(cand, counts),
            "dense_scores": _list_array(counts, pa.array(dense, floats)),
            "dense_ranks": _list_array(counts, _ranks(cand, "dense")),
            "fused_ranks": _list_array(counts, pa.array(_positions(cand["q"], counts) + 1, ints)),
            "positive_similarity": _list_array(counts, pa.array(similarity, floats, mask=np.isnan(similarity))),
        }
        if self._bm25 is None:
            for name in ("bm25_scores", "bm25_ranks", "positive_bm25_scores"):
                columns[name] = pa.nulls(n, schemas.CANDIDATES.field(name).type)
            return columns
        bm25_rows = cand["row"] if self._bm25_rows is None else self._bm25_index_rows(cand["row"])
        pos_bm25_rows = pos_rows if self._bm25_rows is None else self._bm25_index_rows(pos_rows)
        scores = cand.get("bm25_score", np.zeros(len(cand["q"])))
        known = cand.get("bm25_found", np.zeros(len(cand["q"]), dtype=bool))
        other = np.flatnonzero(~known)
        scores = scores.copy()
        scores[other] = self._bm25.score_rows(tokens, cand["q"][other], bm25_rows[other])
        columns["bm25_scores"] = _list_array(counts, pa.array(scores, pa.float64()))
        columns["bm25_ranks"] = _list_array(counts, _ranks(cand, "bm25"))
        columns["positive_bm25_scores"] = _list_array(
            pos_counts, pa.array(self._bm25.score_rows(tokens, pos_q, pos_bm25_rows), pa.float64()))
        return columns

    def _top_similarity(self, vectors: _BatchVectors, cand: dict, n: int) -> pa.Array:
        """Per candidate, its highest cosine to the query's first `similarity_top` candidates in
        fused order (pseudo-relevant documents: the most likely relevant of the pool); null for
        those candidates themselves, and everywhere when no filter asked for it."""
        if not self.similarity_top:
            return pa.nulls(n, schemas.CANDIDATES.field("top_similarity").type)
        position = _positions(cand["q"], cand["counts"])
        grid = _grid(cand["q"], cand["row"], n)
        best = vectors.max_cosine(grid, grid[:, :self.similarity_top])[grid >= 0]  # row-major: candidate order
        best[position < self.similarity_top] = np.nan
        return _list_array(cand["counts"], pa.array(best, pa.float32(), mask=np.isnan(best)))

    def _bm25_index_rows(self, rows: np.ndarray) -> np.ndarray:
        # Inverse of the BM25 row -> index row map, for the rare corpus listed in another order.
        if not hasattr(self, "_bm25_of_row"):
            self._bm25_of_row = np.full(len(self._ids), -1, dtype=np.int64)
            self._bm25_of_row[self._bm25_rows] = np.arange(len(self._bm25_rows))
        return self._bm25_of_row[rows]

    def _sources_column(self, cand: dict, counts: np.ndarray) -> pa.Array:
        """Per candidate, the miners that found it, in the configured order."""
        names = [m for m in self.miners if f"{m}_found" in cand]
        found = np.stack([cand[f"{m}_found"] for m in names], axis=1) if names else np.zeros((len(cand["q"]), 0), bool)
        which = np.broadcast_to(np.arange(len(names)), found.shape)[found]  # row-major: candidate order
        inner = _list_array(found.sum(axis=1), pa.array(names, pa.string()).take(pa.array(which, pa.int64())))
        return _list_array(counts, inner)


def _ranks(cand: dict, source: str) -> pa.Array:
    if f"{source}_found" not in cand:
        return pa.nulls(len(cand["q"]), pa.int64())
    return pa.array(cand[f"{source}_rank"], pa.int64(), mask=~cand[f"{source}_found"])


def _masked(q: np.ndarray, rows: np.ndarray, mask_keys: np.ndarray, n_docs: int) -> np.ndarray:
    if len(mask_keys) == 0 or len(q) == 0:
        return np.zeros(len(q), dtype=bool)
    return np.isin(q * n_docs + rows, mask_keys)


def search_device(faiss_dir: Path, index_config) -> str:
    """Where the candidates workers' index search runs: "gpu" when the config allows a GPU
    (`index.gpu` on, or auto with a usable GPU here) and the index type has a faiss GPU version."""
    from hardneg.stages.engines.faiss_index import gpu_capable, gpu_available

    gpu = getattr(index_config, "gpu", "off")
    if gpu == "off" or (gpu == "auto" and not gpu_available()):
        return "cpu"
    return "gpu" if gpu_capable(faiss_dir) else "cpu"
