"""Sample: choose each pair's negatives among the candidates its query kept.

Strategies (`sampling_strategy`), over the kept candidates in rank order:

* `top`: the best-ranked survivors;
* `random`: a uniform sample without replacement;
* `softmax`: a sample without replacement with probabilities proportional to
  exp(score / temperature) (Gumbel-top-k, which is exactly successive draws without replacement);
  temperature -> 0 gives the highest-scoring survivors;
* `mmr`: maximal marginal relevance, greedily picking the candidate maximising
  lambda * score - (1 - lambda) * (highest cosine to the negatives already picked), so that the K
  negatives are hard *and* different from each other (the cosines are document-document, from
  the index's stored vectors).

Every random draw is seeded per pair (seed, pair id), so it does not depend on batching or on the
runner. The output has one row per input pair, negatives in rank order, with every source's
scores and ranks carried along. Texts are joined in by the writer so this stage never holds the
corpus.

With `relabel` (`false_negatives: relabel`), the candidates a filter recorded as
`relabel:<name>` become the pair's `extra_positive_ids` (never negatives).

The positive consistency check (`consistency_top_k`, `consistency_min_score`) flags a pair whose
positive ranks below the top k of its query's dense ranking of the whole corpus, or scores below
the minimum: the writer routes flagged pairs to rejects (`positive_inconsistent`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg import schemas
from hardneg.stages.base import MapStage, Resources
from hardneg.stages.filters import KEPT, RELABEL, SCORE_COLUMNS, POSITIVE_COLUMNS


def pair_rng(seed: int, pair_id: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def softmax_pick(scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> list[int]:
    """k distinct positions drawn without replacement with probabilities proportional to
    exp(score / temperature), by the Gumbel-top-k trick. Missing (NaN) scores are never drawn
    while a scored candidate is left."""
    scores = np.asarray(scores, dtype=np.float64)
    logits = np.where(np.isnan(scores), -np.inf, scores / temperature)
    gumbel = rng.gumbel(size=len(scores))
    keys = np.where(np.isinf(logits), -np.inf, logits + gumbel)
    order = sorted(range(len(scores)), key=lambda j: (-keys[j], -gumbel[j], j))
    return order[:k]


def mmr_pick(scores: np.ndarray, cosines: np.ndarray, k: int, lam: float) -> list[int]:
    """k positions chosen greedily by maximal marginal relevance: each maximises
    lam * score - (1 - lam) * (highest cosine to the positions already chosen); ties go to the
    earlier (better-ranked) position. Missing scores count as -inf."""
    scores = np.where(np.isnan(np.asarray(scores, dtype=np.float64)), -np.inf, scores)
    chosen: list[int] = []
    redundancy = np.full(len(scores), -np.inf)
    left = np.ones(len(scores), dtype=bool)
    while len(chosen) < min(k, len(scores)):
        value = lam * scores - (1.0 - lam) * np.where(np.isinf(redundancy), 0.0, redundancy)
        value = np.where(left, value, -np.inf)
        if np.all(value == -np.inf):
            j = int(np.flatnonzero(left)[0])
        else:
            j = int(np.argmax(value))
        chosen.append(j)
        left[j] = False
        redundancy = np.maximum(redundancy, cosines[:, j])
    return chosen


class SampleStage(MapStage):
    name = "sample"
    version = "3"
    in_process = True  # cheap per query: runs in the driver

    def __init__(self, *, num_negatives: int, strategy: str, seed: int, score: str, temperature: float = 0.05,
                 mmr_lambda: float = 0.7, index_dir: Path | None = None, consistency_top_k: int | None = None,
                 consistency_min_score: float | None = None, quotas: dict[str, int] | None = None,
                 relabel: bool = False, batch_size: int = 1024) -> None:
        super().__init__()
        self.relabel = relabel
        self.quotas = dict(quotas or {})
        self.num_negatives = num_negatives
        self.strategy = strategy
        self.seed = seed
        self.score = score
        self.temperature = temperature
        self.mmr_lambda = mmr_lambda
        self.index_dir = str(index_dir) if index_dir else None
        self.consistency_top_k = consistency_top_k
        self.consistency_min_score = consistency_min_score
        if strategy == "mmr" and index_dir is None:
            raise ValueError("mmr sampling needs the index dir (the stored document vectors)")
        self.resources = Resources(num_cpus=1, batch_size=batch_size)

    def fingerprint_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"num_negatives": self.num_negatives, "strategy": self.strategy, "seed": self.seed,
                                  "score": self.score}
        if self.strategy == "softmax":
            config["temperature"] = self.temperature
        if self.strategy == "mmr":
            config["mmr_lambda"] = self.mmr_lambda
        if self.quotas:
            config["quotas"] = self.quotas
        if self.relabel:
            config["relabel"] = True
        if self.consistency_top_k is not None or self.consistency_min_score is not None:
            config["consistency"] = [self.consistency_top_k, self.consistency_min_score]
        return config

    def setup(self) -> None:
        self._vectors = None
        if self.strategy == "mmr":
            from hardneg.stages.io import VectorFile, read_table

            index_dir = Path(self.index_dir)
            self._vectors = VectorFile(index_dir / "vectors.npy")
            from hardneg.stages.io import DocIds

            self._ids = DocIds(read_table(index_dir / "ids", columns=["doc_id"]).column("doc_id"))

    def _cosines(self, doc_ids: list[str]) -> np.ndarray:
        rows = self._ids.rows(pa.array(doc_ids, pa.string()))
        if (rows < 0).any():
            raise KeyError(doc_ids[int(np.flatnonzero(rows < 0)[0])])
        if not len(rows):
            return np.zeros((0, 0))
        vectors = self._vectors.take(rows).astype(np.float64)
        return vectors @ vectors.T

    def choose(self, kept: list[int], pair_id: str, scores: list | None = None, cosines: np.ndarray | None = None,
               k: int | None = None) -> list[int]:
        """Indices (into the query's candidates, in rank order) of the pair's negatives: `k` of them
        (default num_negatives). `scores` are the kept candidates' scores (softmax, mmr), `cosines`
        their pairwise cosines (mmr)."""
        k = self.num_negatives if k is None else k
        if self.strategy == "top" or len(kept) <= k:
            return kept[:k]
        if self.strategy == "random":
            picked = pair_rng(self.seed, pair_id).choice(len(kept), size=k, replace=False)
        elif self.strategy == "softmax":
            picked = softmax_pick(_nan(scores), k, self.temperature, pair_rng(self.seed, pair_id))
        elif self.strategy == "mmr":
            picked = mmr_pick(_nan(scores), cosines, k, self.mmr_lambda)
        else:
            raise ValueError(f"unknown sampling strategy {self.strategy!r}")
        return [kept[j] for j in sorted(picked)]

    def choose_with_quotas(self, kept: list[int], sources: list[list[str]], pair_id: str, scores: list | None,
                           cosines: np.ndarray | None) -> list[int]:
        """Per-source quotas (e.g. 3 dense + 2 bm25): each source first gets its best-ranked
        survivors up to its quota, in the quotas' order; the rest of K comes from the sampling
        strategy over the remaining survivors. Negatives come back in rank order."""
        if not self.quotas:
            return self.choose(kept, pair_id, scores, cosines)
        chosen: list[int] = []
        for source, quota in self.quotas.items():
            pool = [j for j in kept if source in (sources[j] or []) and j not in chosen]
            chosen += pool[:quota]
        chosen = chosen[: self.num_negatives]
        missing = self.num_negatives - len(chosen)
        if missing > 0:
            positions = [i for i, j in enumerate(kept) if j not in chosen]
            rest = [kept[i] for i in positions]
            rest_scores = [scores[i] for i in positions] if scores is not None else None
            rest_cosines = cosines[np.ix_(positions, positions)] if cosines is not None else None
            chosen += self.choose(rest, pair_id, rest_scores, rest_cosines, k=missing)
        return sorted(chosen)

    def _inconsistent(self, rank: int | None, score: float | None) -> bool:
        if self.consistency_top_k is not None and (rank is None or rank > self.consistency_top_k):
            return True
        if self.consistency_min_score is not None and (score is None or score < self.consistency_min_score):
            return True
        return False

    def transform(self, batch: pa.Table) -> pa.Table:
        """One mined row per pair of the batch, built from flat arrays: the negatives of every pair
        are positions into the batch's flattened candidates, gathered column by column."""
        self.ensure_setup()
        cands = _Candidates.of(batch)
        pairs = _Pairs.of(batch)
        if self.strategy == "top" and not self.quotas:
            chosen, counts = self._top_for_pairs(cands, pairs)
        else:
            chosen, counts = self._choose_per_pair(batch, cands, pairs)
        return self._mined(batch, cands, pairs, chosen, counts)

    def _top_for_pairs(self, cands: "_Candidates", pairs: "_Pairs") -> tuple[np.ndarray, np.ndarray]:
        """`top` without quotas: every pair of a query gets its first num_negatives kept candidates."""
        position = np.cumsum(cands.kept) - 1  # index among the batch's kept candidates
        first_kept = np.cumsum(np.bincount(cands.group[cands.kept], minlength=len(cands.counts)))
        first_kept = np.r_[0, first_kept[:-1]]
        selected = np.flatnonzero(cands.kept & (position - first_kept[cands.group] < self.num_negatives))
        per_query = np.bincount(cands.group[selected], minlength=len(cands.counts))
        return _repeat_runs(selected, per_query, pairs.group)

    def _choose_per_pair(self, batch: pa.Table, cands: "_Candidates", pairs: "_Pairs") -> tuple[np.ndarray, np.ndarray]:
        """The seeded strategies and quotas: `choose_with_quotas` pair by pair (each pair has its
        own seeded generator, drawn in the same order as always), on numpy views of its query."""
        scores = _flat_values(_column(batch, SCORE_COLUMNS[self.score]), cands)
        sources = batch.column("sources").to_pylist() if self.quotas else None
        pair_ids = pairs.ids.to_pylist()
        chosen, counts = [], np.zeros(len(pair_ids), dtype=np.int64)
        pair_starts = np.searchsorted(pairs.group, np.arange(len(cands.counts)))
        for g in range(len(cands.counts)):
            lo = int(cands.starts[g])
            kept_at = np.flatnonzero(cands.kept[lo:lo + cands.counts[g]])
            kept = kept_at.tolist()
            kept_scores = scores[lo + kept_at].tolist()
            cosines = None
            if self.strategy == "mmr" and len(kept) > self.num_negatives:
                cosines = self._cosines(cands.ids.take(pa.array(lo + kept_at)).to_pylist())
            for p in range(int(pair_starts[g]), int(pair_starts[g]) + int(pairs.per_query[g])):
                picked = self.choose_with_quotas(kept, sources[g] if sources else [], pair_ids[p], kept_scores, cosines)
                chosen.append(lo + np.asarray(picked, dtype=np.int64))
                counts[p] = len(picked)
        return np.concatenate(chosen + [np.zeros(0, np.int64)]), counts

    def _mined(self, batch: pa.Table, cands: "_Candidates", pairs: "_Pairs", chosen: np.ndarray,
               counts: np.ndarray) -> pa.Table:
        def pick(column: str) -> pa.Array:
            return _gather(_column(batch, column), cands, chosen, counts, pairs.group)

        def positive(column: str) -> pa.Array:
            return _aligned_positive(_column(batch, column), pairs)

        dense, rank = positive("positive_dense_scores"), positive("positive_ranks")
        columns = {
            "pair_order": pairs.order, "pair_id": pairs.ids,
            "query_id": batch.column("query_id").take(pa.array(pairs.group)),
            "query": batch.column("text").take(pa.array(pairs.group)),
            "positive_id": pairs.positive_ids, "positive": pa.nulls(len(pairs.group), pa.string()),
            "positive_score": positive(POSITIVE_COLUMNS[self.score]), "positive_ce_score": positive("positive_ce_scores"),
            "negative_ids": pick("candidate_ids"), "negatives": pa.nulls(len(pairs.group), pa.list_(pa.string())),
            "negative_scores": pick(SCORE_COLUMNS[self.score]), "negative_ranks": pick("fused_ranks"),
            "negative_sources": pick("sources"), "negative_dense_scores": pick("dense_scores"),
            "negative_dense_ranks": pick("dense_ranks"), "negative_bm25_scores": pick("bm25_scores"),
            "negative_bm25_ranks": pick("bm25_ranks"), "negative_ce_scores": pick("ce_scores"),
            "negative_fused_ranks": pick("fused_ranks"), "positive_dense_score": dense, "positive_rank": rank,
            "inconsistent": self._inconsistent_pairs(rank, dense),
            "extra_positive_ids": self._extra_positives(cands, pairs),
            "extra_positives": pa.nulls(len(pairs.group), pa.list_(pa.string())),
        }
        return pa.table([columns[f.name].cast(f.type) for f in schemas.MINED], schema=schemas.MINED)

    def _inconsistent_pairs(self, rank: pa.Array, score: pa.Array) -> pa.Array:
        """`_inconsistent` for every pair."""
        out = np.zeros(len(rank), dtype=bool)
        if self.consistency_top_k is not None:
            r = rank.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls: NaN
            out |= np.isnan(r) | (r > self.consistency_top_k)
        if self.consistency_min_score is not None:
            s = score.cast(pa.float64()).to_numpy(zero_copy_only=False)
            out |= np.isnan(s) | (s < self.consistency_min_score)
        return pa.array(out)

    def _extra_positives(self, cands: "_Candidates", pairs: "_Pairs") -> pa.Array:
        """With relabel: the query's relabelled candidates, in rank order, but the pair's own positive."""
        n = len(pairs.group)
        if not self.relabel or not len(cands.decisions):
            return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
        relabelled = pc.starts_with(cands.decisions, RELABEL).to_numpy(zero_copy_only=False)
        selected = np.flatnonzero(relabelled)
        at, per_pair = _repeat_runs(selected, np.bincount(cands.group[selected], minlength=len(cands.counts)), pairs.group)
        ids = cands.ids.take(pa.array(at))
        owner = np.repeat(np.arange(n), per_pair)
        keep = ~pc.equal(ids, pairs.positive_ids.take(pa.array(owner))).to_numpy(zero_copy_only=False)
        return _list_of(np.bincount(owner[keep], minlength=n), ids.filter(pa.array(keep)))

    def transform_rows(self, batch: pa.Table) -> pa.Table:
        """`transform` row by row over Python dicts: the reference the batch path is tested against."""
        self.ensure_setup()
        out: list[dict[str, Any]] = []
        score_column = SCORE_COLUMNS[self.score]
        for row in batch.to_pylist():
            kept = [j for j, d in enumerate(row["decisions"]) if d == KEPT]
            # Relabelled candidates (false_negatives: relabel) become extra positives of every pair
            # of their query, in rank order; they are never negatives (their decision is not kept).
            extra = [row["candidate_ids"][j] for j, d in enumerate(row["decisions"]) if self.relabel and d.startswith(RELABEL)]
            kept_scores = [row[score_column][j] for j in kept] if row.get(score_column) is not None else [None] * len(kept)
            cosines = None
            if self.strategy == "mmr" and len(kept) > self.num_negatives:
                cosines = self._cosines([row["candidate_ids"][j] for j in kept])
            dense_positive = row.get("positive_dense_scores") or []
            positive_ranks = row.get("positive_ranks") or []
            for pair_id, order, positive_id, positive_index in zip(
                row["pair_ids"], row["pair_order"], row["positive_ids"], range(len(row["pair_ids"]))
            ):
                chosen = self.choose_with_quotas(kept, row["sources"], pair_id, kept_scores, cosines)
                dense_score = dense_positive[positive_index] if dense_positive else None
                positive_rank = positive_ranks[positive_index] if positive_ranks else None

                def pick(column: str) -> list | None:
                    values = row.get(column)
                    return None if values is None else [values[j] for j in chosen]

                positive_scores = row.get(POSITIVE_COLUMNS[self.score]) or []
                positive_ce = row.get("positive_ce_scores") or []
                out.append(
                    {
                        "pair_order": order,
                        "pair_id": pair_id,
                        "query_id": row["query_id"],
                        "query": row["text"],
                        "positive_id": positive_id,
                        "positive": None,
                        "positive_score": positive_scores[positive_index] if positive_scores else None,
                        "positive_ce_score": positive_ce[positive_index] if positive_ce else None,
                        "negative_ids": pick("candidate_ids"),
                        "negatives": None,
                        "negative_scores": pick(score_column),
                        "negative_ranks": pick("fused_ranks"),
                        "negative_sources": pick("sources"),
                        "negative_dense_scores": pick("dense_scores"),
                        "negative_dense_ranks": pick("dense_ranks"),
                        "negative_bm25_scores": pick("bm25_scores"),
                        "negative_bm25_ranks": pick("bm25_ranks"),
                        "negative_ce_scores": pick("ce_scores"),
                        "negative_fused_ranks": pick("fused_ranks"),
                        "positive_dense_score": dense_score,
                        "positive_rank": positive_rank,
                        "inconsistent": self._inconsistent(positive_rank, dense_score),
                        "extra_positive_ids": [d for d in extra if d != positive_id],
                        "extra_positives": None,
                    }
                )
        return pa.Table.from_pylist(out, schema=schemas.MINED)


class _Candidates:
    """A batch's candidates, flattened: query row of each, per-query counts and starts, kept mask."""

    @classmethod
    def of(cls, batch: pa.Table) -> "_Candidates":
        self = cls()
        ids = _column(batch, "candidate_ids")
        self.counts = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.starts = np.cumsum(self.counts) - self.counts
        self.group = np.repeat(np.arange(len(self.counts), dtype=np.int64), self.counts)
        self.ids = pc.list_flatten(ids)
        self.decisions = pc.list_flatten(_column(batch, "decisions"))
        self.kept = pc.equal(self.decisions, KEPT).to_numpy(zero_copy_only=False).astype(bool)
        return self


class _Pairs:
    """A batch's pairs, flattened in query then list order: query row, position among the
    query's positives, ids and order."""

    @classmethod
    def of(cls, batch: pa.Table) -> "_Pairs":
        self = cls()
        pair_ids = _column(batch, "pair_ids")
        self.group = pc.list_parent_indices(pair_ids).to_numpy().astype(np.int64)
        self.per_query = np.bincount(self.group, minlength=batch.num_rows)
        self.index = np.arange(len(self.group)) - (np.cumsum(self.per_query) - self.per_query)[self.group]
        self.ids = pc.list_flatten(pair_ids)
        self.order = pc.list_flatten(_column(batch, "pair_order"))
        self.positive_ids = pc.list_flatten(_column(batch, "positive_ids"))
        return self


def _column(batch: pa.Table, name: str) -> pa.Array | None:
    if name not in batch.column_names:
        return None
    column = batch.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _list_of(counts: np.ndarray, values: pa.Array, mask: np.ndarray | None = None) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=None if mask is None else pa.array(mask))


def _repeat_runs(values: np.ndarray, per_query: np.ndarray, pair_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's copy of its query's run of `values` (grouped by query): flat values, counts."""
    starts = np.cumsum(per_query) - per_query
    counts = per_query[pair_group]
    total = int(counts.sum())
    at = np.repeat(starts[pair_group] - (np.cumsum(counts) - counts), counts) + np.arange(total)
    return values[at], counts


def _list_positions(array: pa.Array, cands: _Candidates, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat candidate positions, the positions in `array.values` of an aligned list column,
    and whether each one's row has a list (not null)."""
    offsets = array.offsets.to_numpy().astype(np.int64)
    group = cands.group[flat]
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return offsets[group] + (flat - cands.starts[group]), valid[group]


def _flat_values(array: pa.Array | None, cands: _Candidates) -> np.ndarray:
    """An aligned float list column at every candidate, float64, NaN where null."""
    out = np.full(len(cands.group), np.nan)
    if array is None or array.null_count == len(array) or not len(out):
        return out
    at, valid = _list_positions(array, cands, np.arange(len(out)))
    values = array.values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    out[valid] = values[at[valid]]
    return out


def _gather(array: pa.Array | None, cands: _Candidates, chosen: np.ndarray, counts: np.ndarray,
            pair_group: np.ndarray) -> pa.Array:
    """Each pair's chosen entries of an aligned list column (null for a pair whose query has no
    list there): the old `pick`."""
    n = len(pair_group)
    if array is None or array.null_count == len(array):
        return pa.nulls(n, array.type if array is not None else pa.list_(pa.float32()))
    at, valid = _list_positions(array, cands, chosen)
    pair_valid = array.is_valid().to_numpy(zero_copy_only=False)[pair_group]
    values = array.values.take(pa.array(at[valid]))
    return _list_of(np.where(pair_valid, counts, 0), values, None if pair_valid.all() else ~pair_valid)


def _aligned_positive(array: pa.Array | None, pairs: _Pairs) -> pa.Array:
    """Each pair's entry of a list aligned with its query's positives; null where the query's
    list is null or empty (the old `values[i] if values else None`)."""
    n = len(pairs.group)
    if array is None or array.null_count == len(array):
        return pa.nulls(n, array.type.value_type if array is not None else pa.float32())
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)[pairs.group]
    offsets = array.offsets.to_numpy().astype(np.int64)[pairs.group]
    has = lengths > 0
    index = np.where(has, offsets + pairs.index, 0)
    return array.values.take(pa.array(index, mask=~has))


def _nan(values: list | None) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values or []], dtype=np.float64)
