"""Sample: choose each pair's negatives among the candidates its query kept.

`top` takes the best-ranked survivors; `random` draws a seeded sample of them, seeded per pair so
the draw does not depend on batching or on the runner. The output has one row per input pair,
negatives in rank order, with every source's scores and ranks carried along. Texts are joined
in by the writer so this stage never holds the corpus.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from stages.base import MapStage, Resources
from stages.filters import KEPT, SCORE_COLUMNS, POSITIVE_COLUMNS


def pair_rng(seed: int, pair_id: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


class SampleStage(MapStage):
    name = "sample"
    version = "1"

    def __init__(self, *, num_negatives: int, strategy: str, seed: int, score: str, batch_size: int = 1024) -> None:
        super().__init__()
        self.num_negatives = num_negatives
        self.strategy = strategy
        self.seed = seed
        self.score = score
        self.resources = Resources(num_cpus=1, batch_size=batch_size)

    def fingerprint_config(self) -> dict[str, Any]:
        return {"num_negatives": self.num_negatives, "strategy": self.strategy, "seed": self.seed, "score": self.score}

    def choose(self, kept: list[int], pair_id: str) -> list[int]:
        """Indices (into the query's candidates, in rank order) of the pair's negatives."""
        k = self.num_negatives
        if self.strategy == "top" or len(kept) <= k:
            return kept[:k]
        if self.strategy == "random":
            picked = pair_rng(self.seed, pair_id).choice(len(kept), size=k, replace=False)
            return [kept[j] for j in sorted(picked)]
        raise ValueError(f"unknown sampling strategy {self.strategy!r}")

    def transform(self, batch: pa.Table) -> pa.Table:
        out: list[dict[str, Any]] = []
        score_column = SCORE_COLUMNS[self.score]
        for row in batch.to_pylist():
            kept = [j for j, d in enumerate(row["decisions"]) if d == KEPT]
            for pair_id, order, positive_id, positive_index in zip(
                row["pair_ids"], row["pair_order"], row["positive_ids"], range(len(row["pair_ids"]))
            ):
                chosen = self.choose(kept, pair_id)

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
                    }
                )
        return pa.Table.from_pylist(out, schema=schemas.MINED)
