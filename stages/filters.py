"""Filters: decide, for every candidate of every query, whether it is kept or which filter
dropped it. Filters annotate rather than delete, so the summary is a count over decisions and
every candidate is accounted for.

A filter is a *spec*: a dict with a `type`, its parameters, the `score` it reads and a unique
`name` (what the decisions record). Specs run in order and a candidate's decision is the name of
the first spec that drops it ("kept" if none does). The chain of a config is the
sentence-transformers keys first, in sentence-transformers' order (`range_min`, `max_score`,
`min_score`, `absolute_margin`, `relative_margin`, all reading `score`), then the `filters` list
in its order. Types:

| type | params | drops a candidate |
|---|---|---|
| `range_min` | `value` | whose fused rank is <= value (the top `value` candidates) |
| `range_max` | `value` | whose fused rank is > value |
| `max_score` / `min_score` | `value`, `score` | scoring above / below value |
| `absolute_margin` | `value`, `score` | scoring above positive - value |
| `relative_margin` | `value`, `score` | scoring above positive - value * abs(positive) |
| `percentile` | `value` (0-100), `score` | scoring above the value-th percentile of its query's candidate scores |
| `near_duplicate` | `threshold` | whose document-document cosine to any of the query's positives is above threshold |
| `agreement` | `top`, `margin`, `score` | that >= 2 miners rank within `top` and scoring above positive - margin |
| `ce_threshold` | `value` | whose cross-encoder score is above value (RocketQA denoising) |
| `ce_margin` | `value` | whose cross-encoder score is above the positive's - value |

"positive" is the query's lowest-scoring positive under the filter's score; |positive| keeps the
relative margin correct when scores are negative. A candidate without the score a filter reads is
never dropped by it (it cannot be judged). `score` is `dense`, `bm25` or `cross_encoder`; the rank
filters read `rank` (fused ranks) and `near_duplicate` reads `dense` (the bi-encoder's vectors).
The cross-encoder filters read `cross_encoder`, so the rerank stage, which only scores what the
other filters keep, leaves them for after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from hardneg.stages.base import MapStage, Resources

KEPT = "kept"
SCORE_COLUMNS = {"dense": "dense_scores", "bm25": "bm25_scores", "cross_encoder": "ce_scores"}
POSITIVE_COLUMNS = {"dense": "positive_dense_scores", "bm25": "positive_bm25_scores", "cross_encoder": "positive_ce_scores"}
RANK_COLUMNS = {"dense": "dense_ranks", "bm25": "bm25_ranks"}
SCORES = ("dense", "bm25", "cross_encoder")

# type -> (parameters with their defaults (None = required), the score it reads: None = the
# spec's own `score` (default: the config's), else fixed)
FILTER_TYPES: dict[str, tuple[dict[str, Any], str | None]] = {
    "range_min": ({"value": None}, "rank"),
    "range_max": ({"value": None}, "rank"),
    "max_score": ({"value": None}, None),
    "min_score": ({"value": None}, None),
    "absolute_margin": ({"value": None}, None),
    "relative_margin": ({"value": None}, None),
    "percentile": ({"value": None}, None),
    "near_duplicate": ({"threshold": None}, "dense"),
    "agreement": ({"top": 10, "margin": 0.05}, None),
    "ce_threshold": ({"value": None}, "cross_encoder"),
    "ce_margin": ({"value": None}, "cross_encoder"),
}
ST_KEYS = ("range_min", "max_score", "min_score", "absolute_margin", "relative_margin")


class FilterSpecError(ValueError):
    pass


def _number(value: Any, where: str, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FilterSpecError(f"{where}: expected a number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise FilterSpecError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def normalize_spec(spec: dict[str, Any], default_score: str = "dense", taken: set[str] | None = None) -> dict[str, Any]:
    """A complete spec (type, params, score, unique name) from a user's dict; FilterSpecError on
    an unknown type, an unknown or missing parameter, or a value out of range."""
    if not isinstance(spec, dict):
        raise FilterSpecError(f"a filter must be a mapping with a type, got {spec!r}")
    kind = spec.get("type")
    if kind not in FILTER_TYPES:
        raise FilterSpecError(f"unknown filter type {kind!r} (one of {', '.join(FILTER_TYPES)})")
    params, fixed_score = FILTER_TYPES[kind]
    unknown = set(spec) - set(params) - {"type", "name", "score"}
    if unknown:
        raise FilterSpecError(f"filter {kind}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(params)}, score, name)")
    out: dict[str, Any] = {"type": kind}
    for param, default in params.items():
        value = spec.get(param, default)
        if value is None:
            raise FilterSpecError(f"filter {kind}: missing {param}")
        out[param] = _number(value, f"filter {kind}.{param}", integer=param == "top" or kind.startswith("range_"))
    if fixed_score is not None:
        if spec.get("score") not in (None, fixed_score):
            raise FilterSpecError(f"filter {kind} reads the {fixed_score} score, not {spec['score']!r}")
        out["score"] = fixed_score
    else:
        score = spec.get("score", default_score)
        if score not in SCORES:
            raise FilterSpecError(f"filter {kind}: score must be one of {', '.join(SCORES)}, got {score!r}")
        out["score"] = score
    if kind == "range_min" and out["value"] < 0 or kind == "range_max" and out["value"] <= 0:
        raise FilterSpecError(f"filter {kind}: value out of range")
    if kind == "percentile" and not 0 <= out["value"] <= 100:
        raise FilterSpecError("filter percentile: value must be within 0..100")
    if kind == "agreement" and out["top"] <= 0:
        raise FilterSpecError("filter agreement: top must be positive")
    name = spec.get("name") or kind
    if not isinstance(name, str) or name == KEPT:
        raise FilterSpecError(f"filter {kind}: invalid name {name!r}")
    if taken is not None:
        base, n = name, 2
        while name in taken:
            if spec.get("name"):
                raise FilterSpecError(f"two filters are named {name!r}")
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
    out["name"] = name
    return out


def specs_from_config(config) -> list[dict[str, Any]]:
    """The filter chain of a MineConfig: the sentence-transformers keys first (in their order),
    then the `filters` list in its order."""
    taken: set[str] = set()
    specs: list[dict[str, Any]] = []
    if config.range_min:
        specs.append(normalize_spec({"type": "range_min", "value": config.range_min}, config.score, taken))
    for key in ST_KEYS[1:]:
        value = getattr(config, key)
        if value is not None:
            specs.append(normalize_spec({"type": key, "value": float(value), "score": config.score}, config.score, taken))
    for spec in getattr(config, "filters", None) or []:
        specs.append(normalize_spec(spec, config.score, taken))
    return specs


def reads_bm25(config) -> bool:
    """Whether the config reads BM25 scores (its `score` or a filter): the candidates stage then
    scores every candidate with BM25, even when BM25 is not one of the miners."""
    return config.score == "bm25" or any(spec["score"] == "bm25" for spec in specs_from_config(config))


def _floats(values, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass
class QueryView:
    """One query's candidates as arrays (NaN where a score or rank is missing)."""

    ranks: np.ndarray
    scores: dict[str, np.ndarray]
    positive: dict[str, float]  # lowest positive score per score kind (NaN if unknown)
    source_ranks: dict[str, np.ndarray]
    similarity: np.ndarray  # highest cosine to the query's positives

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "QueryView":
        n = len(row["candidate_ids"])
        scores, positive = {}, {}
        for kind, column in SCORE_COLUMNS.items():
            scores[kind] = _floats(row.get(column), n)
            pos = [v for v in (row.get(POSITIVE_COLUMNS[kind]) or []) if v is not None]
            positive[kind] = float(min(pos)) if pos else np.nan
        return cls(
            ranks=np.asarray(row["fused_ranks"], dtype=np.int64),
            scores=scores,
            positive=positive,
            source_ranks={kind: _floats(row.get(column), n) for kind, column in RANK_COLUMNS.items()},
            similarity=_floats(row.get("positive_similarity"), n),
        )


def _threshold(view: QueryView, spec: dict[str, Any]) -> float:
    """The highest score a candidate may have under a margin filter (inf when unknown)."""
    p = view.positive[spec["score"]]
    if np.isnan(p):
        return np.inf
    if spec["type"] in ("absolute_margin", "ce_margin"):
        return p - spec["value"]
    if spec["type"] == "agreement":
        return p - spec["margin"]
    return p - spec["value"] * abs(p)


def drops(view: QueryView, spec: dict[str, Any]) -> np.ndarray:
    """Boolean mask of the candidates this filter drops. A candidate without the score a filter
    reads is never dropped by it (it cannot be judged)."""
    kind = spec["type"]
    if kind == "range_min":
        return view.ranks <= spec["value"]
    if kind == "range_max":
        return view.ranks > spec["value"]
    with np.errstate(invalid="ignore"):
        if kind == "near_duplicate":
            return view.similarity > spec["threshold"]
        s = view.scores[spec["score"]]
        if kind in ("max_score", "ce_threshold"):
            return s > spec["value"]
        if kind == "min_score":
            return s < spec["value"]
        if kind in ("absolute_margin", "relative_margin", "ce_margin"):
            return s > _threshold(view, spec)
        if kind == "percentile":
            known = ~np.isnan(s)
            if not known.any():
                return np.zeros(len(s), dtype=bool)
            return s > np.percentile(s[known], spec["value"])
        if kind == "agreement":
            votes = sum((r <= spec["top"]).astype(int) for r in view.source_ranks.values())
            return (votes >= 2) & (s > _threshold(view, spec))
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


class FilterStage(MapStage):
    name = "filter"
    version = "2"

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
