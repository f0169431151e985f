"""The filters that read a candidate's relations to the rest of the run: `neighbour_positive` (a
known positive of one of its query's nearest queries) and `pseudo_relevance` (close to one of its
query's first candidates). Checked against brute-force numpy on tiny built vectors and on a real
run of 30 Cranfield queries, batch path against row path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hardneg import MineConfig, run_mine
from hardneg.pipeline.errors import FilterSpecError
from hardneg.stages.engines.faiss_index import IndexConfig
from hardneg.stages.filters import NEIGHBOUR_COLUMN, decide, neighbour_ranks, normalize_spec
from hardneg.stages.io import ShardWriter, read_table
from hardneg.stages.query_neighbours import QueryNeighboursStage, read_neighbours
from resilience import Run, assert_same_rows, mine_cmd


def brute_force_neighbours(ids: list[str], positives: list[list[str]], vectors: np.ndarray, k: int) -> dict:
    """{(query, doc): rank}: the positives of each query's k nearest other queries (lowest rank
    kept), its own positives left out."""
    similarity = vectors @ vectors.T
    out: dict[tuple[str, str], int] = {}
    for i, query in enumerate(ids):
        others = [j for j in np.argsort(-similarity[i], kind="stable") if j != i][:k]
        for rank, j in enumerate(others, start=1):
            for doc in positives[j]:
                if doc not in positives[i] and (query, doc) not in out:
                    out[(query, doc)] = rank
    return out


def test_query_neighbours_are_the_positives_of_the_nearest_other_queries(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    vectors[1] = vectors[0] + 0.01  # a near-duplicate query
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"q{i}" for i in range(40)]
    positives = [[f"d{i}"] for i in range(40)]
    positives[5] = ["d5", "d6"]  # a query sharing a positive with another: never its own neighbour positive
    queries = tmp_path / "queries"
    with ShardWriter(queries, pa.schema([("query_id", pa.string()), ("positive_ids", pa.list_(pa.string())),
                                         ("embedding", pa.list_(pa.float32(), 16))])) as writer:
        writer.write(pa.table({"query_id": ids, "positive_ids": positives,
                               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 16)}))
    out = tmp_path / "out"
    out.mkdir()
    info = QueryNeighboursStage(3, IndexConfig()).run({"queries": queries}, out)
    table = read_neighbours(out)
    got = {(q, d): r for q, d, r in zip(*(table.column(c).to_pylist() for c in ("query_id", "doc_id", "rank")))}
    assert info == {"queries": 40, "k": 3}
    assert got == brute_force_neighbours(ids, positives, vectors, 3)
    assert got[("q0", "d1")] == 1 and got[("q1", "d0")] == 1
    assert ("q6", "d6") not in got and not (out / "faiss").exists()


def test_spec_validation():
    assert normalize_spec({"type": "neighbour_positive"})["k"] == 2
    assert normalize_spec({"type": "pseudo_relevance", "value": 95})["top"] == 3
    for bad in ({"type": "neighbour_positive", "k": 0}, {"type": "neighbour_positive", "k": 1.5},
                {"type": "pseudo_relevance"}, {"type": "pseudo_relevance", "value": 120},
                {"type": "pseudo_relevance", "value": 90, "top": 0}):
        with pytest.raises(FilterSpecError):
            normalize_spec(bad)


@pytest.mark.slow
def test_both_filters_on_a_real_run_agree_with_brute_force(small_beir, tmp_path):
    filters = [{"type": "neighbour_positive", "k": 3}, {"type": "pseudo_relevance", "value": 90, "top": 3}]
    config = MineConfig(beir=small_beir, out=tmp_path / "out", work_dir=tmp_path / "work", positives="best",
                        hide_extra_positives=True, num_negatives=3, runner="local", filters=filters)
    result = run_mine(config, progress=False)
    paths = {s.name: s.path for s in result.stages}
    rows = read_table(paths["filter"]).to_pylist()
    vectors = np.load(paths["index"] / "vectors.npy")
    row_of = {d: i for i, d in enumerate(read_table(paths["index"] / "ids").column("doc_id").to_pylist())}
    queries = read_table(paths["embed_queries"])
    query_vectors = np.stack(queries.column("embedding").to_numpy(zero_copy_only=False))
    neighbours = brute_force_neighbours(queries.column("query_id").to_pylist(),
                                        queries.column("positive_ids").to_pylist(), query_vectors, 3)
    dropped = {"neighbour_positive": 0, "pseudo_relevance": 0}
    for r in rows:
        # top_similarity: the cosine to the nearest of the query's first 3 candidates, none for those.
        first = [row_of[d] for d in r["candidate_ids"][:3]]
        want = (vectors[[row_of[d] for d in r["candidate_ids"]]] @ vectors[first].T).max(axis=1)
        assert r["top_similarity"][:3] == [None] * 3
        np.testing.assert_allclose(r["top_similarity"][3:], want[3:], atol=1e-6)
        known = np.array(r["top_similarity"][3:], dtype=np.float64)
        for i, decision in enumerate(r["decisions"]):
            if (r["query_id"], r["candidate_ids"][i]) in neighbours:
                assert decision == "neighbour_positive"
            elif i >= 3 and r["top_similarity"][i] > np.percentile(known, 90):
                assert decision == "pseudo_relevance"
            else:
                assert decision == "kept"
            dropped[decision] = dropped.get(decision, 0) + 1
    assert dropped["neighbour_positive"] > 0 and dropped["pseudo_relevance"] > 0, dropped
    assert {k: v for k, v in result.stats["decisions"].items()} == {k: v for k, v in dropped.items() if v}
    # The batch decisions are the row reference's, given the same neighbour ranks.
    table = read_table(paths["filter"])
    ranks = neighbour_ranks(table, read_neighbours(paths["query_neighbours"])).to_pylist()
    specs = [normalize_spec(f) for f in filters]
    for r, rank in zip(rows, ranks):
        assert decide({**r, NEIGHBOUR_COLUMN: rank}, specs) == r["decisions"]


def test_a_neighbour_filter_without_its_table_is_refused():
    from hardneg.stages.filters import FilterStage

    stage = FilterStage([normalize_spec({"type": "neighbour_positive"})])
    with pytest.raises(ValueError, match="query_neighbours"):
        stage.setup()


def test_query_neighbours_of_a_single_query_is_empty(tmp_path: Path):
    queries = tmp_path / "queries"
    with ShardWriter(queries, pa.schema([("query_id", pa.string()), ("positive_ids", pa.list_(pa.string())),
                                         ("embedding", pa.list_(pa.float32(), 4))])) as writer:
        writer.write(pa.table({"query_id": ["q"], "positive_ids": [["d"]],
                               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4, np.float32)), 4)}))
    out = tmp_path / "out"
    out.mkdir()
    QueryNeighboursStage(2, IndexConfig()).run({"queries": queries}, out)
    assert read_neighbours(out).num_rows == 0


@pytest.mark.slow
def test_local_and_ray_runs_with_both_filters_write_the_same_rows(small_beir, tmp_path):
    """The query_neighbours stage and the two filters give the same rows on local Ray as in
    process (the neighbour table is one global stage; the filter runs in the driver)."""
    config = tmp_path / "filters.yaml"
    config.write_text("filters:\n  - {type: lexical_duplicate, value: 55}\n  - {type: neighbour_positive, k: 3}\n"
                      "  - {type: pseudo_relevance, value: 90}\n")
    outs = {}
    for runner in ("local", "ray"):
        outs[runner] = tmp_path / runner
        extra = ["--runner", runner, "--config", str(config)] + (["--set", "workers=1"] if runner == "ray" else [])
        run = Run(mine_cmd(small_beir, outs[runner], tmp_path / f"work-{runner}", *extra), tmp_path, runner)
        assert run.wait(600) == 0, run.stderr[-3000:]
    assert_same_rows(outs["ray"], outs["local"])
    decisions = json.loads((outs["ray"] / "stats.json").read_text())["decisions"]
    assert decisions.get("neighbour_positive", 0) > 0 and decisions.get("pseudo_relevance", 0) > 0, decisions
