"""Every filter and sampler on hand-computed cases (no model, no pipeline run)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from hardneg import schemas
from hardneg.pipeline.config import ConfigError, MineConfig, build_config
from hardneg.stages.filters import KEPT, QueryView, decide, drops, normalize_spec, reads_bm25, specs_from_config
from hardneg.stages.io import ShardWriter
from hardneg.stages.sample import SampleStage, mmr_pick, softmax_pick
from hardneg.stages.write import WriteStage


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


# ---------------------------------------------------------------------------- samplers
def stage(strategy: str, k: int = 3, **kw) -> SampleStage:
    return SampleStage(num_negatives=k, strategy=strategy, seed=7, score="dense", **kw)


def test_top_and_random():
    kept = [0, 2, 3, 5, 8, 9]
    assert stage("top").choose(kept, "q:1") == [0, 2, 3]
    a = stage("random").choose(kept, "q:1")
    assert a == stage("random").choose(kept, "q:1") and a == sorted(a) and set(a) <= set(kept) and len(a) == 3
    assert stage("random").choose([1, 2], "q:1") == [1, 2]  # fewer than k: all of them


def test_softmax_is_seeded_per_pair_and_reproducible():
    kept = list(range(10))
    scores = [0.9 - 0.01 * j for j in kept]
    s = stage("softmax", temperature=0.05)
    draws = {tuple(s.choose(kept, f"q:{i}", scores)) for i in range(20)}
    assert len(draws) > 1  # it does sample
    for i in range(5):
        assert s.choose(kept, f"q:{i}", scores) == stage("softmax", temperature=0.05).choose(kept, f"q:{i}", scores)
    assert s.choose(kept, "q:1", scores) == sorted(s.choose(kept, "q:1", scores))


def test_softmax_temperature_to_zero_equals_top():
    kept = [1, 4, 6, 7, 11, 12, 20]
    scores = [0.8, 0.79, 0.7, 0.69, 0.5, 0.45, 0.1]  # rank order = score order
    for i in range(20):
        assert stage("softmax", temperature=1e-6).choose(kept, f"q:{i}", scores) == stage("top").choose(kept, f"q:{i}")


def test_softmax_probabilities():
    # Two candidates, k=1, scores 0 and T*ln(3): the second is drawn with probability 3/4.
    t = 0.05
    rng = np.random.default_rng(0)
    picks = [softmax_pick(np.array([0.0, t * math.log(3)]), 1, t, rng)[0] for _ in range(4000)]
    assert abs(np.mean(picks) - 0.75) < 0.03
    # An unscored candidate is never drawn while scored ones are left.
    assert sorted(softmax_pick(np.array([0.5, np.nan, 0.4]), 2, t, rng)) == [0, 2]


def test_mmr_hand_computed():
    # A, A' (near-duplicate of A), B, C, D; lambda 0.7.
    scores = np.array([0.9, 0.89, 0.8, 0.7, 0.6])
    cos = np.array([
        [1.0, 0.99, 0.3, 0.1, 0.0],
        [0.99, 1.0, 0.3, 0.1, 0.0],
        [0.3, 0.3, 1.0, 0.2, 0.5],
        [0.1, 0.1, 0.2, 1.0, 0.0],
        [0.0, 0.0, 0.5, 0.0, 1.0],
    ])
    # 1: A (0.63). 2: A' .623-.297=.326, B .56-.09=.47, C .49-.03=.46, D .42 -> B.
    # 3: A' .326, C .49-.06=.43, D .42-.15=.27 -> C.
    assert mmr_pick(scores, cos, 3, 0.7) == [0, 2, 3]
    assert mmr_pick(scores, cos, 3, 1.0) == [0, 1, 2]  # lambda 1 = top by score


def write_index(folder, vectors: np.ndarray, ids: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "vectors.npy", vectors.astype(np.float32))
    with ShardWriter(folder / "ids", pa.schema([("doc_id", pa.string())])) as writer:
        writer.write_rows([{"doc_id": d} for d in ids])


def test_mmr_never_picks_two_near_duplicates(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(10, 64))
    twins = base + 0.05 * rng.normal(size=base.shape)
    vectors = np.concatenate([base, twins])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(20)]
    write_index(tmp_path / "index", vectors, ids)
    scores = rng.uniform(0.5, 0.7, size=20)
    order = np.argsort(-scores)
    filtered = {
        "query_id": "q", "text": "query", "pair_ids": ["q:p"], "pair_order": [0], "positive_ids": ["p"],
        "mask_ids": ["p"], "candidate_ids": [ids[j] for j in order], "decisions": [KEPT] * 20,
        "dense_scores": scores[order].tolist(), "fused_ranks": list(range(1, 21)), "sources": [["dense"]] * 20,
        "positive_dense_scores": [0.8], "positive_ranks": [1],
    }
    s = stage("mmr", k=6, index_dir=tmp_path / "index")
    out = s.transform(pa.Table.from_pylist([filtered]))
    picked = out.column("negative_ids")[0].as_py()
    assert len(picked) == 6
    rows = [ids.index(d) for d in picked]
    sims = vectors[rows] @ vectors[rows].T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 0.9
    # top would have taken twins: the setup is a real test
    top = [ids[j] for j in order[:6]]
    top_sims = vectors[[ids.index(d) for d in top]] @ vectors[[ids.index(d) for d in top]].T
    np.fill_diagonal(top_sims, 0)
    assert top_sims.max() > 0.95 or len({ids.index(d) % 10 for d in top}) < 6


# ---------------------------------------------------------------------------- consistency
def filtered_row(query_id: str, positives: list[str], ranks: list[int], dense: list[float], n_cand: int = 3) -> dict:
    return {
        "query_id": query_id, "text": f"text of {query_id}",
        "pair_ids": [f"{query_id}:{p}" for p in positives], "pair_order": list(range(len(positives))),
        "positive_ids": positives, "mask_ids": positives, "positive_dense_scores": dense,
        "positive_bm25_scores": None, "positive_ranks": ranks,
        "candidate_ids": [f"c{i}" for i in range(n_cand)], "sources": [["dense"]] * n_cand,
        "dense_scores": [0.5 - 0.1 * i for i in range(n_cand)], "dense_ranks": list(range(1, n_cand + 1)),
        "bm25_scores": None, "bm25_ranks": None, "fused_ranks": list(range(1, n_cand + 1)),
        "positive_similarity": [0.1] * n_cand, "positive_ce_scores": None, "ce_scores": None,
        "decisions": [KEPT] * n_cand,
    }


def test_consistency_flags_and_writer_rejects(tmp_path):
    rows = [
        filtered_row("q1", ["a", "b"], ranks=[1, 30], dense=[0.8, 0.6]),   # b ranks 30 > 10
        filtered_row("q2", ["c"], ranks=[3], dense=[0.2]),                  # c scores 0.2 < 0.3
        filtered_row("q3", ["d"], ranks=[2], dense=[0.7], n_cand=1),        # consistent but short
    ]
    for i, r in enumerate(rows):
        r["pair_order"] = [10 * i + j for j in range(len(r["pair_ids"]))]
    s = SampleStage(num_negatives=2, strategy="top", seed=1, score="dense", consistency_top_k=10, consistency_min_score=0.3)
    mined = s.transform(pa.Table.from_pylist(rows, schema=schemas.FILTERED))
    assert mined.column("inconsistent").to_pylist() == [False, True, True, False]
    assert mined.column("positive_rank").to_pylist() == [1, 30, 3, 2]

    dirs = {name: tmp_path / name for name in ("mined", "filtered", "corpus", "rejects", "pairs")}
    with ShardWriter(dirs["mined"], schemas.MINED) as w:
        w.write(mined)
    with ShardWriter(dirs["filtered"], schemas.FILTERED) as w:
        w.write(pa.Table.from_pylist(rows, schema=schemas.FILTERED))
    with ShardWriter(dirs["corpus"], schemas.CORPUS) as w:
        w.write_rows([{"doc_id": d, "text": f"doc {d}"} for d in ["a", "b", "c", "d", "c0", "c1", "c2"]])
    with ShardWriter(dirs["rejects"], schemas.REJECTS) as w:
        w.write(schemas.empty(schemas.REJECTS))
    with ShardWriter(dirs["pairs"], schemas.PAIRS) as w:
        w.write_rows([{"pair_id": p, "pair_order": o, "query_id": r["query_id"], "positive_id": pid}
                      for r in rows for p, o, pid in zip(r["pair_ids"], r["pair_order"], r["positive_ids"])])
    out = tmp_path / "out"
    out.mkdir()
    stats = WriteStage(format="n-tuple", num_negatives=2, metadata_columns=True).run(dirs, out)
    assert stats["input_pairs"] == 4 and stats["output_pairs"] == 1
    assert stats["rejected_pairs"] == {"positive_inconsistent": 2, "short_of_negatives": 1}
    assert stats["pairs_inconsistent"] == 2
    assert stats["decisions"] == {"kept": 7} and stats["candidates"] == 7
    from hardneg.stages.io import read_table

    rejects = read_table(out / "rejects").to_pylist()
    inconsistent = [r for r in rejects if r["reason"] == "positive_inconsistent"]
    assert {r["id"] for r in inconsistent} == {"q1:b", "q2:c"}
    assert all(r["stage"] == "consistency" and r["pair"] for r in inconsistent)
    assert "ranks 30" in next(r for r in inconsistent if r["id"] == "q1:b")["detail"]
    assert "0.2000" in next(r for r in inconsistent if r["id"] == "q2:c")["detail"]


def test_consistency_top_k_bounded_by_search_depth():
    with pytest.raises(ConfigError, match="consistency_top_k"):
        build_config(overrides={"consistency_top_k": 500})


# ---------------------------------------------------------------------------- candidates' columns
@pytest.mark.parametrize("exact_threshold", [10_000, 0])
def test_candidates_positive_ranks_and_similarity(tmp_path, exact_threshold):
    """positive_ranks (1 + documents scoring higher, over the whole corpus) and
    positive_similarity (highest cosine to a positive) against brute force; with the exact scan
    (small corpus) and, above index.exact_threshold, from the search: exact within its depth,
    depth + 1 beyond."""
    from hardneg.stages.engines.faiss_index import IndexConfig
    from hardneg.stages.candidates import CandidatesStage
    from hardneg.stages.index import IndexStage

    rng = np.random.default_rng(5)
    n, dim = 300, 16
    docs = rng.normal(size=(n, dim))
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    ids = [f"d{i:03d}" for i in range(n)]
    with ShardWriter(tmp_path / "corpus", schemas.CORPUS) as w:
        w.write_rows([{"doc_id": d, "text": d} for d in ids])
    with ShardWriter(tmp_path / "emb", schemas.embeddings_schema(dim)) as w:
        w.write(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(docs.astype(np.float32).ravel()), dim)}))
    cfg = IndexConfig(index="Flat", exact_threshold=exact_threshold)
    (tmp_path / "index").mkdir()
    IndexStage(cfg).run({"corpus": tmp_path / "corpus", "embeddings": tmp_path / "emb"}, tmp_path / "index")

    queries = rng.normal(size=(4, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = docs @ queries.T.astype(np.float64)
    positives = []
    for q in range(4):
        order = np.argsort(-scores[:, q])
        positives.append([ids[order[0]], ids[order[7]], ids[order[200]]])  # ranks 1, 8, 201
    batch = pa.Table.from_pylist([
        {"query_id": f"q{q}", "text": "", "pair_ids": [f"q{q}:{p}" for p in positives[q]], "pair_order": [0, 1, 2],
         "positive_ids": positives[q], "mask_ids": positives[q], "embedding": queries[q].tolist()}
        for q in range(4)
    ])
    stage = CandidatesStage(miners=["dense"], range_max=20, rrf_k=60, index_dir=tmp_path / "index", index_config=cfg)
    out = stage(batch).to_pylist()
    depth = 20 + 3  # range_max + masked ids
    for q, row in enumerate(out):
        expected = [1 + int(np.sum(scores[:, q] > scores[ids.index(p), q])) for p in positives[q]]
        assert expected == [1, 8, 201]
        assert row["positive_ranks"] == (expected if exact_threshold else [1, 8, depth + 1])
        pos = docs[[ids.index(p) for p in positives[q]]]
        sims = (docs[[ids.index(c) for c in row["candidate_ids"]]] @ pos.T).max(axis=1)
        np.testing.assert_allclose(row["positive_similarity"], sims, atol=1e-6)
        assert len(row["candidate_ids"]) == 20 and not set(row["candidate_ids"]) & set(positives[q])


def test_quotas_take_each_sources_best_then_fill_in_rank_order():
    from hardneg.stages.sample import SampleStage

    stage = SampleStage(num_negatives=4, strategy="top", seed=0, score="dense", quotas={"bm25": 2, "dense": 1})
    sources = [["dense"], ["dense"], ["dense", "bm25"], ["dense"], ["bm25"], ["bm25"]]
    kept = [0, 1, 2, 3, 4, 5]
    # bm25 quota: 2 and 4; dense quota: 0; one more from the rest by rank: 1
    assert stage.choose_with_quotas(kept, sources, "q:p", None, None) == [0, 1, 2, 4]
    # a quota larger than its pool is filled from the rest
    stage = SampleStage(num_negatives=3, strategy="top", seed=0, score="dense", quotas={"bm25": 5})
    assert stage.choose_with_quotas([0, 1, 3], sources, "q:p", None, None) == [0, 1, 3]
