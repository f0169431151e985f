"""Filters: decide, for every candidate of every query, whether it is kept or which filter
dropped it. Filters annotate rather than delete, so the summary is a count over decisions and
every candidate is accounted for.

The sentence-transformers filters keep their meanings (`range_min`, `max_score`, `min_score`,
`absolute_margin`, `relative_margin`) and can be pointed at any score: dense, bm25 or
cross_encoder. Margins are measured against the query's lowest-scoring positive and use
|positive score| so they stay correct when scores are negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from stages.base import MapStage, Resources

KEPT = "kept"
SCORE_COLUMNS = {"dense": "dense_scores", "bm25": "bm25_scores", "cross_encoder": "ce_scores"}
POSITIVE_COLUMNS = {"dense": "positive_dense_scores", "bm25": "positive_bm25_scores", "cross_encoder": "positive_ce_scores"}


@dataclass
class QueryView:
    """One query's candidates as arrays (NaN where a score is missing)."""

    ranks: np.ndarray
    scores: dict[str, np.ndarray]
    positive: dict[str, float]  # lowest positive score per score kind (NaN if unknown)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "QueryView":
        n = len(row["candidate_ids"])
        scores, positive = {}, {}
        for kind, column in SCORE_COLUMNS.items():
            values = row.get(column)
            scores[kind] = np.array([np.nan if v is None else v for v in values], dtype=np.float64) if values is not None else np.full(n, np.nan)
            pos = [v for v in (row.get(POSITIVE_COLUMNS[kind]) or []) if v is not None]
            positive[kind] = float(min(pos)) if pos else np.nan
        return cls(ranks=np.asarray(row["fused_ranks"], dtype=np.int64), scores=scores, positive=positive)


def _threshold(view: QueryView, spec: dict[str, Any]) -> np.ndarray:
    """The highest score a candidate may have under a margin filter (inf when unknown)."""
    p = view.positive[spec["score"]]
    if np.isnan(p):
        return np.full(len(view.ranks), np.inf)
    if spec["type"] == "absolute_margin":
        return np.full(len(view.ranks), p - spec["value"])
    return np.full(len(view.ranks), p - spec["value"] * abs(p))


def drops(view: QueryView, spec: dict[str, Any]) -> np.ndarray:
    """Boolean mask of the candidates this filter drops. A candidate without the score a filter
    reads is never dropped by it (it cannot be judged)."""
    kind = spec["type"]
    if kind == "range_min":
        return view.ranks <= spec["value"]
    if kind == "range_max":
        return view.ranks > spec["value"]
    s = view.scores[spec["score"]]
    with np.errstate(invalid="ignore"):
        if kind == "max_score":
            return s > spec["value"]
        if kind == "min_score":
            return s < spec["value"]
        if kind in ("absolute_margin", "relative_margin"):
            return s > _threshold(view, spec)
    raise ValueError(f"unknown filter {kind!r}")


def decide(row: dict[str, Any], specs: list[dict[str, Any]], *, skip_score: str | None = None) -> list[str]:
    """The decision for each candidate: "kept" or the name of the first filter that drops it.
    `skip_score` leaves out the filters reading that score (the cross-encoder runs in between)."""
    view = QueryView.from_row(row)
    decisions = np.full(len(view.ranks), KEPT, dtype=object)
    for spec in specs:
        if skip_score is not None and spec.get("score") == skip_score:
            continue
        undecided = decisions == KEPT
        if not undecided.any():
            break
        decisions[undecided & drops(view, spec)] = spec["name"]
    return decisions.tolist()


def specs_from_config(config) -> list[dict[str, Any]]:
    """The filter chain of a MineConfig, in the order sentence-transformers applies them."""
    specs: list[dict[str, Any]] = []
    if config.range_min:
        specs.append({"name": "range_min", "type": "range_min", "value": config.range_min})
    for key in ("max_score", "min_score", "absolute_margin", "relative_margin"):
        value = getattr(config, key)
        if value is not None:
            specs.append({"name": key, "type": key, "value": float(value), "score": config.score})
    return specs


class FilterStage(MapStage):
    name = "filter"
    version = "1"

    def __init__(self, specs: list[dict[str, Any]], batch_size: int = 1024) -> None:
        super().__init__()
        self.specs = specs
        self.resources = Resources(num_cpus=1, batch_size=batch_size)

    def fingerprint_config(self) -> dict[str, Any]:
        return {"filters": self.specs}

    def transform(self, batch: pa.Table) -> pa.Table:
        decisions = [decide(row, self.specs) for row in batch.to_pylist()]
        if "ce_scores" not in batch.column_names:
            n = batch.num_rows
            batch = batch.append_column("positive_ce_scores", pa.nulls(n, pa.list_(pa.float32())))
            batch = batch.append_column("ce_scores", pa.nulls(n, pa.list_(pa.float32())))
        return batch.append_column("decisions", pa.array(decisions, type=pa.list_(pa.string())))
