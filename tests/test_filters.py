"""Every filter on hand-computed cases (no model, no pipeline run); sampling is in test_sample.py,
the candidates' columns in test_candidates.py."""

from __future__ import annotations

import pytest

from hardneg.pipeline.config import ConfigError, MineConfig, build_config
from hardneg.stages.filters import QueryView, decide, drops, normalize_spec, reads_bm25, specs_from_config


def row(n: int | None = None, **columns) -> dict:
    """A candidates row: only what filters read; unspecified scores are missing."""
    n = n or len(next(v for v in columns.values() if isinstance(v, list)))
    base = {
        "candidate_ids": [f"d{i}" for i in range(n)],
        "fused_ranks": list(range(1, n + 1)),
        "dense_scores": None, "bm25_scores": None, "ce_scores": None,
        "positive_dense_scores": None, "positive_bm25_scores": None, "positive_ce_scores": None,
        "dense_ranks": None, "bm25_ranks": None, "positive_similarity": None,
    }
    base.update(columns)
    return base


def dropped(r: dict, spec: dict) -> list[bool]:
    return drops(QueryView.from_row(r), normalize_spec(spec)).tolist()


# ---------------------------------------------------------------------------- rank filters
def test_range_min_and_range_max_edges():
    r = row(5, dense_scores=[0.5] * 5)
    assert dropped(r, {"type": "range_min", "value": 2}) == [True, True, False, False, False]
    assert dropped(r, {"type": "range_min", "value": 0}) == [False] * 5
    assert dropped(r, {"type": "range_max", "value": 4}) == [False, False, False, False, True]
    assert dropped(r, {"type": "range_max", "value": 5}) == [False] * 5
    # range_min=0 (the default) adds no filter at all.
    assert specs_from_config(MineConfig(range_min=0, filters=[])) == []
    assert specs_from_config(MineConfig(range_min=3, filters=[]))[0] == {"type": "range_min", "value": 3, "score": "rank", "name": "range_min"}


# ---------------------------------------------------------------------------- score filters
def test_max_and_min_score():
    r = row(dense_scores=[0.75, 0.5, 0.25, None])
    assert dropped(r, {"type": "max_score", "value": 0.5}) == [True, False, False, False]
    assert dropped(r, {"type": "min_score", "value": 0.5}) == [False, False, True, False]


def test_margins_use_the_lowest_of_several_positives():
    # Positives 0.75 and 0.5: the margins are measured against 0.5.
    r = row(dense_scores=[0.625, 0.5, 0.375, 0.25, 0.125, None], positive_dense_scores=[0.75, 0.5])
    # absolute 0.125: drop above 0.375
    assert dropped(r, {"type": "absolute_margin", "value": 0.125}) == [True, True, False, False, False, False]
    # relative 0.5: drop above 0.5 - 0.5 * 0.5 = 0.25
    assert dropped(r, {"type": "relative_margin", "value": 0.5}) == [True, True, True, False, False, False]


def test_relative_margin_with_negative_scores():
    # Positive -0.5 (the lower of -0.25, -0.5); relative 0.5 must lower the bar to -0.75 (using
    # |positive|), not raise it to -0.25 as positive * (1 - margin) would.
    r = row(dense_scores=[-0.5, -0.625, -0.75, -1.0], positive_dense_scores=[-0.25, -0.5])
    assert dropped(r, {"type": "relative_margin", "value": 0.5}) == [True, True, False, False]


def test_margin_reads_the_chosen_score():
    r = row(dense_scores=[0.9, 0.1], positive_dense_scores=[0.5],
            bm25_scores=[2.0, 12.0], positive_bm25_scores=[10.0])
    assert dropped(r, {"type": "absolute_margin", "value": 0.25, "score": "dense"}) == [True, False]
    assert dropped(r, {"type": "absolute_margin", "value": 1.0, "score": "bm25"}) == [False, True]
    # No positive score known: nothing can be judged.
    assert dropped(row(dense_scores=[0.9]), {"type": "relative_margin", "value": 0.1}) == [False]


def test_percentile_drops_above_the_queries_own_percentile():
    scores = [float(s) for s in range(10, 0, -1)] + [None]  # 10 .. 1, then one unscored
    r = row(dense_scores=scores)
    # numpy's (linear) 80th percentile of 1..10 is 1 + 0.8 * 9 = 8.2: 10 and 9 are above it.
    assert dropped(r, {"type": "percentile", "value": 80}) == [True, True] + [False] * 9
    assert dropped(r, {"type": "percentile", "value": 100}) == [False] * 11
    # 50th: 5.5 -> 10..6 dropped
    assert sum(dropped(r, {"type": "percentile", "value": 50})) == 5
    # Rank-normalised: an affine change of the scores (another model's scale) changes nothing.
    shifted = row(dense_scores=[None if s is None else 3 * s - 40 for s in scores])
    assert dropped(shifted, {"type": "percentile", "value": 80}) == dropped(r, {"type": "percentile", "value": 80})


def test_near_duplicate_reads_positive_similarity():
    r = row(positive_similarity=[0.99, 0.95, 0.5, None], dense_scores=[0.1] * 4)
    assert dropped(r, {"type": "near_duplicate", "threshold": 0.95}) == [True, False, False, False]
    assert normalize_spec({"type": "near_duplicate", "threshold": 0.9})["score"] == "dense"


def test_agreement_needs_two_miners_within_top_and_a_score_near_the_positive():
    r = row(
        dense_ranks=[1, 2, 15, 1, None, 3],
        bm25_ranks=[3, 20, 2, None, 1, 4],
        dense_scores=[0.6, 0.6, 0.6, 0.6, 0.6, 0.5],
        positive_dense_scores=[0.625],
    )
    # threshold 0.625 - 0.05 = 0.575: only the first has both ranks <= 10 and a score above it;
    # the last is ranked top-4 by both but scores 0.5.
    assert dropped(r, {"type": "agreement", "top": 10, "margin": 0.05}) == [True, False, False, False, False, False]
    assert dropped(r, {"type": "agreement", "top": 20, "margin": 0.05}) == [True, True, True, False, False, False]
    assert normalize_spec({"type": "agreement"}) == {"type": "agreement", "top": 10, "margin": 0.05, "score": "dense", "name": "agreement"}


def test_cross_encoder_filters():
    r = row(ce_scores=[0.9, 0.1, None, 1.75, 1.5], positive_ce_scores=[3.0, 2.0])
    assert dropped(r, {"type": "ce_threshold", "value": 0.5}) == [True, False, False, True, True]
    # ce_margin: above 2.0 (lowest positive) - 0.5 = 1.5
    assert dropped(r, {"type": "ce_margin", "value": 0.5}) == [False, False, False, True, False]
    assert normalize_spec({"type": "ce_margin", "value": 1})["score"] == "cross_encoder"


# ---------------------------------------------------------------------------- the chain
def test_chain_order_names_and_first_dropper_wins():
    cfg = MineConfig(range_min=1, relative_margin=0.25, filters=[
        {"type": "near_duplicate", "threshold": 0.9},
        {"type": "relative_margin", "value": 0.5},
        {"type": "percentile", "value": 30, "name": "top_half"},
    ])
    specs = specs_from_config(cfg)
    assert [s["name"] for s in specs] == ["range_min", "relative_margin", "near_duplicate", "relative_margin_2", "top_half"]
    assert all("score" in s for s in specs)
    r = row(
        dense_scores=[0.9, 0.4, 0.3, 0.28, 0.2, 0.1, 0.05],
        positive_dense_scores=[0.5],
        positive_similarity=[0.1, 0.1, 0.95, 0.1, 0.1, 0.1, 0.1],
    )
    # rank 1 -> range_min; 0.4 > 0.375 (0.5 - 0.25 * 0.5) -> relative_margin; 0.3 is a near
    # duplicate (and above every later bar: the first filter wins); 0.28 > 0.25 -> relative_margin_2;
    # the 30th percentile of the seven scores is 0.1 + 0.8 * 0.1 = 0.18 -> 0.2 is dropped by top_half.
    assert decide(r, specs) == ["range_min", "relative_margin", "near_duplicate", "relative_margin_2", "top_half", "kept", "kept"]


def test_rerank_skips_filters_that_read_the_cross_encoder():
    cfg = MineConfig(cross_encoder="some/ce", range_min=0, filters=[{"type": "ce_threshold", "value": 0.0},
                                                         {"type": "max_score", "value": 0.8}])
    specs = specs_from_config(cfg)
    r = row(dense_scores=[0.9, 0.5], ce_scores=[None, None])
    assert decide(r, specs, skip_score="cross_encoder") == ["max_score", "kept"]
    r = row(dense_scores=[0.9, 0.5], ce_scores=[None, 0.5])
    assert decide(r, specs) == ["max_score", "ce_threshold"]


@pytest.mark.parametrize("filters, message", [
    ([{"type": "nope"}], "unknown filter type"),
    ([{"type": "percentile"}], "missing value"),
    ([{"type": "percentile", "value": 120}], "within 0..100"),
    ([{"type": "near_duplicate", "threshold": 0.9, "colour": 1}], "unknown key"),
    ([{"type": "ce_threshold", "value": 0.1}], "give a cross_encoder"),
    ([{"type": "agreement"}], "two miners"),
    ([{"type": "near_duplicate", "threshold": 0.9, "score": "bm25"}], "reads the dense score"),
    ([{"type": "percentile", "value": 50, "name": "x"}, {"type": "percentile", "value": 60, "name": "x"}], "two filters"),
])
def test_bad_filter_specs_are_config_errors(filters, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides={"filters": filters})


def test_filters_from_set_assignment():
    cfg = build_config(assignments=["range_min=0", "filters=[{type: near_duplicate, threshold: 0.9}, {type: percentile, value: 95}]"])
    assert [s["name"] for s in specs_from_config(cfg)] == ["near_duplicate", "percentile"]


def test_defaults_are_valid_and_explainable():
    cfg = MineConfig()
    specs = specs_from_config(cfg)
    # Drop the 45% of candidates lexically closest to the positive and the 35% BM25 scores highest
    # for the query (per-query percentiles, no model-specific threshold); take the best-ranked survivors.
    assert cfg.range_min == 0
    assert [(s["name"], s["score"], s["value"]) for s in specs] == [("lexical_duplicate", "bm25", 55), ("percentile", "bm25", 65)]
    assert cfg.miners == ["dense"] and cfg.sampling_strategy == "top"
    assert reads_bm25(cfg)  # BM25 scores the dense candidates without mining any
    assert not reads_bm25(MineConfig(filters=[]))
    assert reads_bm25(MineConfig(filters=[], score="bm25"))
