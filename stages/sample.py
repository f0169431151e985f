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
            ids = read_table(index_dir / "ids", columns=["doc_id"]).column("doc_id").to_pylist()
            self._row_of = {doc_id: row for row, doc_id in enumerate(ids)}

    def _cosines(self, doc_ids: list[str]) -> np.ndarray:
        rows = np.array([self._row_of[d] for d in doc_ids], dtype=np.int64)
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


def _nan(values: list | None) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values or []], dtype=np.float64)
