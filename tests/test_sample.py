"""Sampling (stages/sample.py) on hand-computed cases: top, random, softmax, mmr, quotas, and
the consistency flags the writer turns into rejects."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from hardneg import schemas
from hardneg.pipeline.config import ConfigError, build_config
from hardneg.stages.filters import KEPT
from hardneg.stages.io import ShardWriter
from hardneg.stages.sample import SampleStage, mmr_pick, softmax_pick
from hardneg.stages.write import WriteStage


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
