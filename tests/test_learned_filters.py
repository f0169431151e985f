"""The lexical near-duplicate filter, the per-run positive-unlabelled (pu) filter and
`false_negatives: relabel`, on hand-made rows and on real runs over the Cranfield subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hardneg.pipeline.outputs import evaluate as ev
from hardneg.pipeline.config import ConfigError, MineConfig, build_config
from hardneg.stages.filters import LEXICAL_COLUMN, RELABEL, PUModel, decide, normalize_spec, pu_features


def row(n: int, **columns) -> dict:
    base = {"query_id": "q", "candidate_ids": [f"d{i}" for i in range(n)], "fused_ranks": list(range(1, n + 1)),
            "positive_ids": ["p"], "dense_scores": None, "bm25_scores": None, "ce_scores": None,
            "positive_dense_scores": None, "positive_bm25_scores": None, "positive_ce_scores": None,
            "dense_ranks": None, "bm25_ranks": None, "positive_similarity": None, "positive_ranks": None}
    base.update(columns)
    return base


def test_lexical_duplicate_drops_above_the_queries_percentile():
    spec = normalize_spec({"type": "lexical_duplicate", "value": 80}, taken=set())
    r = row(11, **{LEXICAL_COLUMN: [float(v) for v in range(11, 0, -1)]})
    # numpy's 80th percentile of 1..11 is 9: 11 and 10 (the first two candidates) are above it.
    assert decide(r, [spec]) == ["lexical_duplicate"] * 2 + ["kept"] * 9
    # Without the scores (the rerank stage's pre-pass) it decides nothing.
    assert decide(row(3), [spec]) == ["kept"] * 3
    with pytest.raises(ConfigError, match="within 0..100"):
        build_config(overrides={"filters": [{"type": "lexical_duplicate", "value": 101}]})


def test_pu_spec_validation():
    assert normalize_spec({"type": "pu"}) == {"type": "pu", "budget": 0.3, "far": 50, "relabel": 0.5, "score": "dense", "name": "pu"}
    for bad in ({"type": "pu", "budget": 1.5}, {"type": "pu", "far": 0}, {"type": "pu", "relabel": -1}):
        with pytest.raises(ConfigError):
            build_config(overrides={"filters": [bad]})
    with pytest.raises(ConfigError):
        build_config(overrides={"filters": [{"type": "pu", "name": "relabel:x"}]})


def synthetic_rows(n_queries: int = 60, n: int = 100, seed: int = 0) -> list[dict]:
    """Queries whose positive scores like the top of its candidates, dense and BM25 alike."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_queries):
        dense = np.sort(rng.uniform(0.1, 0.7, n))[::-1]
        bm25 = np.clip(dense * 20 + rng.normal(0, 2, n), 0, None)
        rank = int(rng.integers(1, 4))  # the positive scores like the candidate at its rank
        rows.append(row(n, query_id=f"q{i}", dense_scores=dense.tolist(), bm25_scores=bm25.tolist(),
                        dense_ranks=list(range(1, n + 1)), positive_dense_scores=[float(dense[rank - 1]) + 1e-3],
                        positive_bm25_scores=[float(bm25[rank - 1])], positive_ranks=[rank]))
    return rows


def test_pu_features_describe_positives_as_candidates():
    r = synthetic_rows(1)[0]
    candidates, positives = pu_features(r)
    assert candidates.shape == (100, 4) and positives.shape == (1, 4)
    s = np.asarray(r["dense_scores"])
    np.testing.assert_allclose(candidates[:, 0], (s - s.mean()) / s.std())
    np.testing.assert_allclose(positives[0, 0], (r["positive_dense_scores"][0] - s.mean()) / s.std(), rtol=1e-6)
    # The positive's BM25 rank share: the candidates scoring higher than it.
    assert positives[0, 3] == pytest.approx(np.mean(np.asarray(r["bm25_scores"]) > r["positive_bm25_scores"][0]))


def test_pu_model_learns_that_top_candidates_look_like_positives():
    rows = synthetic_rows()
    spec = normalize_spec({"type": "pu", "budget": 0.3}, taken=set())
    model = PUModel(spec, seed=12)
    for r in rows:
        model.add(r)
    model.fit()
    p = model.probabilities(rows[0])
    # Relevance estimates fall with the rank; the top is dropped, the deep end kept.
    assert p[:5].mean() > p[-50:].mean()
    decisions = decide(rows[0], [spec], models={"pu": model})
    assert decisions[0] == "pu" and decisions[-1] == "kept"
    # Same seed, same model; relabel marks only candidates above both levels.
    again = PUModel(spec, seed=12)
    for r in rows:
        again.add(r)
    assert np.array_equal(again.fit().probabilities(rows[0]), p)
    for r in rows:
        p, plain = model.probabilities(r), decide(r, [spec], models={"pu": model})
        relabelled = decide(r, [spec], models={"pu": model}, relabel=True)
        assert relabelled == [RELABEL + "pu" if q > max(model.relabel_level, model.drop_level) else d
                              for q, d in zip(p, plain)]
    assert any(RELABEL + "pu" in decide(r, [spec], models={"pu": model}, relabel=True) for r in rows)


# ---------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def subset_work(small_beir, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("learned") / "work"


def mine(beir: Path, out: Path, work: Path, **keys):
    from hardneg import run_mine

    cfg = MineConfig(beir=beir, out=out, work_dir=work, positives="best", hide_extra_positives=True, num_negatives=3,
                     runner="local", **keys)
    return run_mine(cfg, progress=False)


def filter_rows(result) -> list[dict]:
    from hardneg.stages.io import read_table

    return read_table(next(s.path for s in result.stages if s.name == "filter")).to_pylist()


@pytest.mark.slow
def test_lexical_duplicate_scores_are_bm25_against_the_positive_text(small_beir, subset_work, tmp_path):
    from hardneg.stages.engines.bm25 import BM25Config, BM25Index
    from hardneg.stages.io import read_table

    result = mine(small_beir, tmp_path / "out", subset_work, filters=[{"type": "lexical_duplicate", "value": 70}])
    paths = {s.name: s.path for s in result.stages}
    index = BM25Index.load(paths["bm25_index"], BM25Config())
    corpus = read_table(paths["ingest"] / "corpus")
    text = dict(zip(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist()))
    rows = filter_rows(result)
    for r in rows[:10]:
        scores = np.asarray(index.score(text[r["positive_ids"][0]], r["candidate_ids"]))
        expected = scores > np.percentile(scores, 70)
        assert [d == "lexical_duplicate" for d in r["decisions"]] == expected.tolist()
    dropped = sum(d == "lexical_duplicate" for r in rows for d in r["decisions"])
    assert dropped == result.stats["decisions"]["lexical_duplicate"] > 0


@pytest.mark.slow
def test_pu_filter_on_cranfield_drops_the_relevant_and_is_deterministic(small_beir, subset_work, tmp_path):
    qrels = ev.read_qrels(small_beir, "test")
    spec = [{"type": "pu", "budget": 0.3}]
    first = filter_rows(mine(small_beir, tmp_path / "a", subset_work, filters=spec))
    share = {}
    for decision in ("pu", "kept"):
        pairs = [(r["query_id"], c) for r in first for c, d in zip(r["candidate_ids"], r["decisions"]) if d == decision]
        share[decision] = sum(c in qrels.get(q, {}) for q, c in pairs) / len(pairs)
    # What it drops is judged relevant far more often than what it keeps.
    assert share["pu"] > 3 * share["kept"], share
    # Decided by one model fitted on the whole input: a new work dir and small batches agree.
    from hardneg.stages.filters import FilterStage
    from hardneg.stages.io import iter_batches
    from hardneg.stages.filters import specs_from_config

    result = mine(small_beir, tmp_path / "b", tmp_path / "work2", filters=spec)
    assert filter_rows(result) == first
    candidates = next(s.path for s in result.stages if s.name == "candidates")
    stage = FilterStage(specs_from_config(MineConfig(filters=spec)), batch_size=7, seed=12, fit_input=candidates)
    decisions = [d for b in iter_batches(candidates, 7) for d in stage(b).column("decisions").to_pylist()]
    assert decisions == [r["decisions"] for r in first]


@pytest.mark.parametrize("format", ["n-tuple", "labeled-pair", "labeled-list", "triplet"])
def test_relabel_makes_extra_positives_never_negatives(small_beir, subset_work, tmp_path, format):
    import datasets

    out = tmp_path / "out"
    filters = [{"type": "pu", "budget": 0.3, "relabel": 0.6}, {"type": "percentile", "value": 65, "score": "bm25"}]
    result = mine(small_beir, out, subset_work, filters=filters, false_negatives="relabel", format=format)
    rows = filter_rows(result)
    relabelled = {(r["query_id"], c) for r in rows for c, d in zip(r["candidate_ids"], r["decisions"]) if d == RELABEL + "pu"}
    assert relabelled
    groups = ev.read_groups(out)
    extra = {(g["query_id"], d) for g in groups for d in g["extra_positive_ids"]}
    assert extra == relabelled
    assert not any((g["query_id"], d) in relabelled for g in groups for d in g["negative_ids"])
    ds = datasets.load_from_disk(str(out))
    if format == "n-tuple":
        assert {"extra_positives", "extra_positive_ids"} <= set(ds.column_names)
        r = next(x for x in ds if x["extra_positive_ids"])
        assert len(r["extra_positives"]) == len(r["extra_positive_ids"])
    if format == "labeled-list":
        r = next(x for x in ds if x["extra_positive_ids"])
        assert r["labels"][: 1 + len(r["extra_positive_ids"])] == [1] * (1 + len(r["extra_positive_ids"]))
    if format == "labeled-pair":
        assert sum(ds["label"]) == ds.num_rows - sum(len(g["negative_ids"]) for g in groups)
    figures = ev.evaluate(small_beir, out, ranks=False)
    qrels = ev.read_qrels(small_beir, "test")
    judged = sum(d in qrels.get(q, {}) for q, d in relabelled)
    assert figures["relabelled"] == {"extra_positives": len(relabelled), "judged_relevant": judged,
                                     "precision": judged / len(relabelled)}
    # With drop (the default) the same candidates are dropped, and no output has extra positives.
    plain = mine(small_beir, tmp_path / "plain", subset_work, filters=filters, format=format)
    assert "extra_positive_ids" not in datasets.load_from_disk(str(tmp_path / "plain")).column_names
    assert plain.stats["decisions"]["pu"] == result.stats["decisions"]["pu"] + len(relabelled)
