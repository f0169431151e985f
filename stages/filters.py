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
| `lexical_duplicate` | `value` (0-100) | whose BM25 score with the query's positive as the BM25 query (a lexical near-duplicate of the positive) is above the value-th percentile of its query's candidates |
| `pu` | `budget`, `far`, `relabel` | whose relevance, as a model fitted on the run's own positives estimates it, is above the level `budget` sets (below) |
| `neighbour_positive` | `k` (2) | that is a known positive of one of its query's `k` nearest other queries (query-query cosine) |
| `pseudo_relevance` | `value` (0-100), `top` (3) | whose highest cosine to its query's `top` first candidates is above the value-th percentile of its query's candidates |

"positive" is the query's lowest-scoring positive under the filter's score; |positive| keeps the
relative margin correct when scores are negative. A candidate without the score a filter reads is
never dropped by it (it cannot be judged). `score` is `dense`, `bm25` or `cross_encoder`; the rank
filters read `rank` (fused ranks) and `near_duplicate` reads `dense` (the bi-encoder's vectors).
The cross-encoder filters read `cross_encoder`, so the rerank stage, which only scores what the
other filters keep, leaves them for after it.

`lexical_duplicate` is `near_duplicate`'s lexical, rank-normalised twin: the candidates' BM25
scores against the text of each of the query's positives (the highest over its positives), read
per query as a percentile, so it carries across collections, models and BM25 score scales with no
threshold to re-tune. The lexical stage before the filter computes them from the run's BM25 index
(stages/lexical.py), so a run that only changes a filter does not score them again.

`neighbour_positive` passes the dataset's own labels between queries: two queries that ask nearly
the same thing share relevant documents, so a document judged relevant for one is no negative for
the other. The query_neighbours stage finds each query's nearest queries once per run
(stages/query_neighbours.py); the filter stage adds each candidate's neighbour rank
(`neighbour_positive_ranks`) before it decides. `pseudo_relevance` reads the cluster hypothesis the
other way: a query's first candidates (fused order) are its most likely relevant documents, and a
candidate very close to one of them is likely relevant too. The candidates stage computes that
cosine (`top_similarity`) when this filter asks for it; the first `top` candidates themselves have
none and are never dropped by it. Both are rank-normalised (a neighbour rank, a per-query
percentile), so no threshold depends on the model or the collection.

`pu` (positive-unlabelled learning) adapts to the data at hand instead of fixing a cosine or a
percentile: one logistic regression per run, fitted on the run's own candidates table (`PUModel`),
with the queries' known positives as the relevant class and a seeded sample of each query's far
candidates (fused rank > `far`: mostly irrelevant, the "unlabelled" class) as the other. Its
features are the ones every candidate already has, normalised per query so one model serves all
queries: the dense score and the BM25 score as z-scores among the query's candidates, the log of
the dense rank and the BM25 score's rank share (a positive gets the rank it would have among its
query's candidates). The threshold is a false-negative budget: a candidate is dropped when its
estimated probability is above the `budget`-quantile of the known positives' probabilities, i.e.
the filter would catch a share 1 - budget of documents that look like the known positives. With
`false_negatives: relabel`, the candidates above the `relabel`-quantile (looking more relevant
than that share of the known positives) are recorded as `relabel:<name>` and become extra
positives. The model sees the whole input before any batch is decided (FilterStage.fit), so its
decisions do not depend on batching; every sample is seeded by (seed, query id).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg.pipeline.errors import FilterSpecError
from hardneg.stages.base import MapStage, Resources
from hardneg.stages.io import lists_like

log = logging.getLogger("hardneg")

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
    "lexical_duplicate": ({"value": None}, "bm25"),
    "pu": ({"budget": 0.3, "far": 50, "relabel": 0.5}, "dense"),
    "neighbour_positive": ({"k": 2}, "dense"),
    "pseudo_relevance": ({"value": None, "top": 3}, "dense"),
}
RELABEL = "relabel:"  # decision prefix of a candidate a filter judged relevant with high confidence
ST_KEYS = ("range_min", "max_score", "min_score", "absolute_margin", "relative_margin")


@dataclass(frozen=True)
class FilterChainConfig:
    """What the filter chain reads of a run's config (`MineConfig.filter_chain()`); validated there."""

    score: str = "dense"
    range_min: int = 0
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    filters: tuple = ()

    @classmethod
    def of(cls, config) -> "FilterChainConfig":
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


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
        out[param] = _number(value, f"filter {kind}.{param}", integer=param in ("top", "far", "k") or kind.startswith("range_"))
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
    if kind in ("percentile", "lexical_duplicate", "pseudo_relevance") and not 0 <= out["value"] <= 100:
        raise FilterSpecError(f"filter {kind}: value must be within 0..100")
    if kind == "pu" and not (0 <= out["budget"] <= 1 and 0 <= out["relabel"] <= 1 and out["far"] >= 1):
        raise FilterSpecError("filter pu: budget and relabel must be within 0..1, far at least 1")
    if kind in ("agreement", "pseudo_relevance") and out["top"] <= 0:
        raise FilterSpecError(f"filter {kind}: top must be positive")
    if kind == "neighbour_positive" and out["k"] <= 0:
        raise FilterSpecError("filter neighbour_positive: k must be positive")
    name = spec.get("name") or kind
    if not isinstance(name, str) or name == KEPT or name.startswith(RELABEL):
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


def specs_from_config(config: FilterChainConfig) -> list[dict[str, Any]]:
    """The filter chain of a config (a FilterChainConfig, or any object with its keys): the sentence-transformers keys first (in their order),
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


def similarity_top(specs: list[dict[str, Any]]) -> int | None:
    """How many first candidates the pseudo_relevance filters compare with (the largest `top`;
    None without one): the candidates stage computes `top_similarity` for it."""
    return max((int(spec["top"]) for spec in specs if spec["type"] == "pseudo_relevance"), default=None)


def neighbour_depth(specs: list[dict[str, Any]]) -> int | None:
    """How many nearest queries the neighbour_positive filters read (the largest `k`; None without one)."""
    return max((int(spec["k"]) for spec in specs if spec["type"] == "neighbour_positive"), default=None)


def reads_bm25(config: FilterChainConfig) -> bool:
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


def _above_percentile(s: np.ndarray, value: float) -> np.ndarray:
    """Which scores are above the value-th percentile of the query's known scores."""
    known = ~np.isnan(s)
    if not known.any():
        return np.zeros(len(s), dtype=bool)
    with np.errstate(invalid="ignore"):
        return s > np.percentile(s[known], value)


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
            return _above_percentile(s, spec["value"])
        if kind == "agreement":
            votes = sum((r <= spec["top"]).astype(int) for r in view.source_ranks.values())
            return (votes >= 2) & (s > _threshold(view, spec))
    raise ValueError(f"unknown filter {kind!r}")


# ---------------------------------------------------------------------------- pu: a learned filter
PU_FEATURES = ("dense_z", "log_dense_rank", "bm25_z", "bm25_rank_share")
PU_FAR_SAMPLE = 10  # far candidates per query in the unlabelled class
PU_MAX_QUERIES = 50_000  # queries the model is fitted on (a seeded choice beyond that)


def _zscores(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    known = reference[~np.isnan(reference)]
    if not len(known):
        return np.zeros(len(values))
    return np.nan_to_num((values - known.mean()) / max(float(known.std()), 1e-6))


def pu_features(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(candidates x features, positives x features) of one query, in PU_FEATURES order. Each
    feature is what the document would have among its query's candidates, so a known positive and
    a candidate are described alike: scores as z-scores against the query's candidates, the dense
    rank in the corpus (a candidate's rank among the candidates plus the positives above it), and
    the share of candidates BM25 scores higher. Without BM25 scores, their features are 0."""
    view = QueryView.from_row(row)
    s, b = view.scores["dense"], view.scores["bm25"]
    pos_s = _floats(row.get("positive_dense_scores"), len(row.get("positive_ids") or []))
    pos_b = _floats(row.get("positive_bm25_scores"), len(pos_s))
    dense_ranks = view.source_ranks["dense"]
    cand_rank = np.where(np.isnan(dense_ranks), view.ranks, dense_ranks) + (pos_s[None, :] > s[:, None]).sum(axis=1)
    pos_rank = _floats(row.get("positive_ranks"), len(pos_s))
    pos_rank = np.where(np.isnan(pos_rank), 1.0, pos_rank)
    known_b = b[~np.isnan(b)]

    def share(values: np.ndarray) -> np.ndarray:
        if not len(known_b):
            return np.zeros(len(values))
        return np.array([np.count_nonzero(known_b > v) / len(known_b) if not np.isnan(v) else 1.0 for v in values])

    def block(scores: np.ndarray, ranks: np.ndarray, bm25: np.ndarray) -> np.ndarray:
        return np.column_stack([_zscores(scores, s), np.log(np.maximum(ranks, 1.0)), _zscores(bm25, b) if len(known_b)
                                else np.zeros(len(scores)), share(bm25)])

    return block(s, cand_rank, b), block(pos_s, pos_rank, pos_b)


def _query_rng(seed: int, query_id: str) -> np.random.Generator:
    import hashlib

    digest = int.from_bytes(hashlib.sha256(f"pu:{query_id}".encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


class PUModel:
    """The `pu` filter's model for one run: logistic regression (scikit-learn, on standardised
    features) of known positives against a seeded sample of far candidates, and the two
    probability levels its budget and relabel quantiles give on the known positives."""

    def __init__(self, spec: dict[str, Any], seed: int) -> None:
        self.spec, self.seed = spec, seed
        self.relevant: list[np.ndarray] = []
        self.unlabelled: list[np.ndarray] = []

    def add(self, row: dict[str, Any]) -> None:
        """Add one query's training examples: its positives, and up to PU_FAR_SAMPLE of its
        candidates ranked beyond `far`, drawn with a generator seeded by (seed, query id)."""
        candidates, positives = pu_features(row)
        self.relevant.append(positives)
        far = np.flatnonzero(np.asarray(row["fused_ranks"]) > self.spec["far"])
        if len(far):
            rng = _query_rng(self.seed, row["query_id"])
            self.unlabelled.append(candidates[np.sort(rng.choice(far, size=min(PU_FAR_SAMPLE, len(far)), replace=False))])

    def fit(self) -> "PUModel":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        relevant = np.concatenate(self.relevant) if self.relevant else np.zeros((0, len(PU_FEATURES)))
        unlabelled = np.concatenate(self.unlabelled) if self.unlabelled else np.zeros((0, len(PU_FEATURES)))
        self.model = None
        if len(relevant) < 2 or len(unlabelled) < 2:
            return self  # nothing to learn from: the filter drops nothing
        x = np.concatenate([relevant, unlabelled])
        y = np.concatenate([np.ones(len(relevant)), np.zeros(len(unlabelled))])
        self.model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000)).fit(x, y)
        p = self.model.predict_proba(relevant)[:, 1]
        self.drop_level = float(np.quantile(p, self.spec["budget"]))
        self.relabel_level = float(np.quantile(p, self.spec["relabel"]))
        self.relevant = self.unlabelled = []
        return self

    def describe(self) -> dict[str, Any]:
        if self.model is None:
            return {"fitted": False}
        scaler, lr = self.model[0], self.model[-1]
        return {"fitted": True, "coefficients": dict(zip(PU_FEATURES, (lr.coef_[0] / scaler.scale_).round(4).tolist())),
                "drop_level": round(self.drop_level, 4), "relabel_level": round(self.relabel_level, 4)}

    def probabilities(self, row: dict[str, Any]) -> np.ndarray:
        candidates, _ = pu_features(row)
        if self.model is None or not len(candidates):
            return np.zeros(len(candidates))
        return self.model.predict_proba(candidates)[:, 1]


LEXICAL_COLUMN = "positive_lexical_scores"  # per candidate, added by the lexical stage (stages/lexical.py)
NEIGHBOUR_COLUMN = "neighbour_positive_ranks"  # per candidate, added by the filter stage (query_neighbours)
TOP_SIMILARITY = "top_similarity"  # per candidate, from the candidates stage
# Filters that drop above a per-query percentile of a column another stage added; without that
# column (the rerank stage's pre-pass) they decide nothing.
PERCENTILE_COLUMNS = {"lexical_duplicate": LEXICAL_COLUMN, "pseudo_relevance": TOP_SIMILARITY}


def decide(row: dict[str, Any], specs: list[dict[str, Any]], *, skip_score: str | None = None,
           models: dict[str, PUModel] | None = None, relabel: bool = False) -> list[str]:
    """The decision for each candidate: "kept" or the name of the first filter that drops it.
    `skip_score` leaves out the filters reading that score (the cross-encoder runs in between).
    `models` holds the fitted model of each `pu` filter (by name); one without a model decides
    nothing. With `relabel`, a `pu` filter records the candidates above its relabel level as
    "relabel:<name>" (extra positives) instead of its name."""
    view = QueryView.from_row(row)
    decisions = np.full(len(view.ranks), KEPT, dtype=object)
    for spec in specs:
        if skip_score is not None and spec.get("score") == skip_score:
            continue
        undecided = decisions == KEPT
        if not undecided.any():
            break
        if spec["type"] in PERCENTILE_COLUMNS:
            values = row.get(PERCENTILE_COLUMNS[spec["type"]])
            if values is not None:
                decisions[undecided & _above_percentile(_floats(values, len(decisions)), spec["value"])] = spec["name"]
            continue
        if spec["type"] == "neighbour_positive":
            decisions[undecided & (_floats(row.get(NEIGHBOUR_COLUMN), len(decisions)) <= spec["k"])] = spec["name"]
            continue
        if spec["type"] == "pu":
            model = (models or {}).get(spec["name"])
            if model is None or model.model is None:
                continue
            p = model.probabilities(row)
            decisions[undecided & (p > model.drop_level)] = spec["name"]
            if relabel:
                decisions[undecided & (p > model.relabel_level) & (p > model.drop_level)] = RELABEL + spec["name"]
            continue
        decisions[undecided & drops(view, spec)] = spec["name"]
    return decisions.tolist()


# ---------------------------------------------------------------------------- whole batches
# FilterStage decides a whole Arrow batch at once: every candidate of every query is one element
# of flat numpy arrays (`group` = its query's row in the batch), and each filter is a vectorised
# comparison. `decide` (one row) stays as the reference the batch path is tested against.


def _list_column(batch: pa.Table, name: str) -> pa.Array | None:
    if name not in batch.column_names:
        return None
    column = batch.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _flat_floats(array: pa.Array | None, counts: np.ndarray) -> np.ndarray:
    """An aligned list column (one value per candidate) as flat float64, NaN where a value or a
    whole row's list is null: what `_floats` gives row by row."""
    total = int(counts.sum())
    if array is None or array.null_count == len(array):
        return np.full(total, np.nan)
    values = pc.fill_null(pc.list_flatten(array).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    if array.null_count == 0:
        return values
    out = np.full(total, np.nan)
    out[np.repeat(array.is_valid().to_numpy(zero_copy_only=False), counts)] = values
    return out


def _positive_minimum(array: pa.Array | None, n_rows: int) -> np.ndarray:
    """Per row, the lowest known value of its list (NaN if none): QueryView's `positive`."""
    out = np.full(n_rows, np.nan)
    if array is None or array.null_count == len(array):
        return out
    values = pc.list_flatten(array).cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls: NaN
    parents = pc.list_parent_indices(array).to_numpy().astype(np.int64)
    known = ~np.isnan(values)
    lowest = np.full(n_rows, np.inf)
    np.minimum.at(lowest, parents[known], values[known])
    has = np.bincount(parents[known], minlength=n_rows) > 0
    out[has] = lowest[has]
    return out


@dataclass
class BatchView:
    """A batch's candidates as flat arrays, QueryView's fields for all queries at once."""

    group: np.ndarray  # query row of each candidate
    counts: np.ndarray  # candidates per query
    ranks: np.ndarray
    scores: dict[str, np.ndarray]
    positive: dict[str, np.ndarray]  # per query
    source_ranks: dict[str, np.ndarray]
    similarity: np.ndarray

    @classmethod
    def from_batch(cls, batch: pa.Table) -> "BatchView":
        ids = _list_column(batch, "candidate_ids")
        counts = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        n = batch.num_rows
        ranks = pc.list_flatten(_list_column(batch, "fused_ranks")).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(
            group=np.repeat(np.arange(n, dtype=np.int64), counts),
            counts=counts,
            ranks=ranks,
            scores={kind: _flat_floats(_list_column(batch, c), counts) for kind, c in SCORE_COLUMNS.items()},
            positive={kind: _positive_minimum(_list_column(batch, c), n) for kind, c in POSITIVE_COLUMNS.items()},
            source_ranks={kind: _flat_floats(_list_column(batch, c), counts) for kind, c in RANK_COLUMNS.items()},
            similarity=_flat_floats(_list_column(batch, "positive_similarity"), counts),
        )


def _batch_threshold(view: BatchView, spec: dict[str, Any]) -> np.ndarray:
    """`_threshold` for every candidate (its query's value; inf where the positive is unknown)."""
    p = view.positive[spec["score"]]
    if spec["type"] in ("absolute_margin", "ce_margin"):
        t = p - spec["value"]
    elif spec["type"] == "agreement":
        t = p - spec["margin"]
    else:
        t = p - spec["value"] * np.abs(p)
    return np.where(np.isnan(p), np.inf, t)[view.group]


def _batch_above_percentile(s: np.ndarray, group: np.ndarray, n_rows: int, value: float) -> np.ndarray:
    """`_above_percentile` for every query at once. Queries with the same number of known scores
    share one np.percentile call along rows (the same arithmetic as one call per query)."""
    known = ~np.isnan(s)
    threshold = np.full(n_rows, np.nan)
    order = np.flatnonzero(known)[np.argsort(group[known], kind="stable")]
    per_query = np.bincount(group[known], minlength=n_rows)
    starts = np.cumsum(per_query) - per_query
    for count in np.unique(per_query[per_query > 0]).tolist():
        rows = np.flatnonzero(per_query == count)
        threshold[rows] = np.percentile(s[order[starts[rows, None] + np.arange(count)]], value, axis=1)
    with np.errstate(invalid="ignore"):
        return s > threshold[group]


def batch_drops(view: BatchView, spec: dict[str, Any]) -> np.ndarray:
    """`drops` for every candidate of a batch."""
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
            return s > _batch_threshold(view, spec)
        if kind == "percentile":
            return _batch_above_percentile(s, view.group, len(view.counts), spec["value"])
        if kind == "agreement":
            votes = sum((r <= spec["top"]).astype(int) for r in view.source_ranks.values())
            return (votes >= 2) & (s > _batch_threshold(view, spec))
    raise ValueError(f"unknown filter {kind!r}")


def _pu_probabilities(batch: pa.Table, model: PUModel) -> np.ndarray:
    # The learned filter's features are per query (z-scores, rank shares): computed row by row,
    # only when a `pu` filter is configured.
    parts = [model.probabilities(row) for row in batch.to_pylist()]
    return np.concatenate(parts + [np.zeros(0)]).astype(np.float64)


def decide_batch(batch: pa.Table, specs: list[dict[str, Any]], *, models: dict[str, PUModel] | None = None,
                 relabel: bool = False, skip_score: str | None = None) -> pa.Array:
    """`decide` for every row of a batch: a list<string> column, one decision per candidate.
    `skip_score` leaves out the filters reading that score, as in `decide`; a PERCENTILE_COLUMNS
    filter decides nothing in a batch without its column, as in `decide`."""
    view = BatchView.from_batch(batch)
    names = [KEPT]
    codes = np.zeros(len(view.ranks), dtype=np.int64)
    for spec in specs:
        if skip_score is not None and spec.get("score") == skip_score:
            continue
        undecided = codes == 0
        if spec["type"] in PERCENTILE_COLUMNS:
            values = _list_column(batch, PERCENTILE_COLUMNS[spec["type"]])
            if values is None:
                continue
            drop = _batch_above_percentile(_flat_floats(values, view.counts), view.group, batch.num_rows, spec["value"])
        elif spec["type"] == "neighbour_positive":
            drop = _flat_floats(_list_column(batch, NEIGHBOUR_COLUMN), view.counts) <= spec["k"]
        elif spec["type"] == "pu":
            model = (models or {}).get(spec["name"])
            if model is None or model.model is None:
                continue
            p = _pu_probabilities(batch, model)
            codes[undecided & (p > model.drop_level)] = len(names)
            names.append(spec["name"])
            if relabel:
                codes[undecided & (p > model.relabel_level) & (p > model.drop_level)] = len(names)
                names.append(RELABEL + spec["name"])
            continue
        else:
            drop = batch_drops(view, spec)
        codes[undecided & drop] = len(names)
        names.append(spec["name"])
    offsets = np.zeros(len(view.counts) + 1, dtype=np.int32)
    np.cumsum(view.counts, out=offsets[1:])
    values = pa.array(names, pa.string()).take(pa.array(codes))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def neighbour_ranks(batch: pa.Table, neighbours: pa.Table) -> pa.ListArray:
    """Per candidate, the rank of the nearest query of which it is a known positive (null: none
    within the table's depth), by one join of the batch's (query, candidate) pairs with the table."""
    ids = _list_column(batch, "candidate_ids")
    parents = pc.list_parent_indices(ids)
    pairs = pa.table({"at": pa.array(np.arange(len(parents), dtype=np.int64)),
                      "query_id": batch.column("query_id").combine_chunks().take(parents),
                      "doc_id": pc.list_flatten(ids)})
    found = pairs.join(neighbours, ["query_id", "doc_id"], join_type="inner", use_threads=False)
    ranks = np.full(len(parents), np.nan)
    ranks[found.column("at").to_numpy()] = found.column("rank").to_numpy()
    return lists_like(ids, ranks, pa.float64())


class FilterStage(MapStage):
    name = "filter"
    version = "3"
    in_process = True  # cheap per query: runs in the driver

    def __init__(self, specs: list[dict[str, Any]], batch_size: int = 1024, *, seed: int = 12,
                 fit_input: Path | None = None, false_negatives: str = "drop", threads: int = 1,
                 neighbours_dir: Path | None = None) -> None:
        super().__init__()
        self.specs = specs
        self.neighbours_dir = str(neighbours_dir) if neighbours_dir else None  # the query_neighbours stage
        self.seed = seed
        self.fit_input = str(fit_input) if fit_input else None
        self.false_negatives = false_negatives
        self.resources = Resources(num_cpus=1, batch_size=batch_size)
        # `threads` batches side by side: numpy and Arrow release the GIL; the models are read-only.
        self.local_batches = max(1, int(threads))

    def fingerprint_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"filters": self.specs}
        if any(spec["type"] == "pu" for spec in self.specs):
            config["seed"] = self.seed  # its training sample
            config["false_negatives"] = self.false_negatives
        return config

    def setup(self) -> None:
        self._models = self.fit()
        self._neighbours = None
        if neighbour_depth(self.specs):
            if self.neighbours_dir is None:
                raise ValueError("a neighbour_positive filter needs the query_neighbours stage's table")
            from hardneg.stages.query_neighbours import read_neighbours

            self._neighbours = read_neighbours(Path(self.neighbours_dir))

    def fit(self) -> dict[str, PUModel]:
        """The `pu` filters' models, fitted on the whole input (every batch is then decided by the
        same model). Queries beyond PU_MAX_QUERIES are left out by a seeded hash of their id."""
        pu_specs = [spec for spec in self.specs if spec["type"] == "pu"]
        if not pu_specs:
            return {}
        if self.fit_input is None:
            raise ValueError("a pu filter needs its input (fit_input) to fit its model")
        from hardneg.stages.io import count_rows, iter_batches

        total = count_rows(Path(self.fit_input))
        models = {spec["name"]: PUModel(spec, self.seed) for spec in pu_specs}
        for batch in iter_batches(Path(self.fit_input), 4096):
            for row in batch.to_pylist():
                if total > PU_MAX_QUERIES and _query_rng(self.seed, row["query_id"]).random() > PU_MAX_QUERIES / total:
                    continue
                for model in models.values():
                    model.add(row)
        for name, model in models.items():
            model.fit()
            log.info("filter %s: %s", name, model.describe())
        return models

    def transform(self, batch: pa.Table) -> pa.Table:
        self.ensure_setup()
        relabel = self.false_negatives == "relabel"
        if LEXICAL_COLUMN not in batch.column_names and any(spec["type"] == "lexical_duplicate" for spec in self.specs):
            raise ValueError(f"a lexical_duplicate filter needs the {LEXICAL_COLUMN} column (the lexical stage)")
        if self._neighbours is not None:
            batch = batch.append_column(NEIGHBOUR_COLUMN, neighbour_ranks(batch, self._neighbours))
        decisions = decide_batch(batch, self.specs, models=self._models, relabel=relabel)
        if "ce_scores" not in batch.column_names:
            n = batch.num_rows
            batch = batch.append_column("positive_ce_scores", pa.nulls(n, pa.list_(pa.float32())))
            batch = batch.append_column("ce_scores", pa.nulls(n, pa.list_(pa.float32())))
        return batch.append_column("decisions", decisions)
