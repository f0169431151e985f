"""Candidates actors open the index through shared pages: two Ray actors on one node, each
mining a batch with the same FAISS index (an exact Flat index, so a batch touches all of it) and
BM25 index, map the files read-only; the pages are resident once, shared by both, and neither
actor's private memory grows by anything like the index's size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shared_index import Probe, build, candidates_stage, index_files, memory  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_candidates_actors_share_the_index_pages(tmp_path):
    import ray

    index_dir, bm25_dir, index_config, bm25_config, queries = build(tmp_path, 100_000, n_queries=32)
    files = index_files(index_dir, bm25_dir)
    faiss_size = sum(f.stat().st_size for f in files if f.suffix == ".faiss")
    stage = candidates_stage(index_dir, bm25_dir, index_config, bm25_config)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        actors = [ray.remote(num_cpus=1)(Probe).remote(stage) for _ in range(2)]
        results = ray.get([a.mine.remote(queries) for a in actors])
        measured = [(memory(pid, files), before) for pid, before, _ in results]
    finally:
        ray.shutdown()
    assert all(rows == queries.num_rows for _, _, rows in results)
    for m, before in measured:
        # The whole FAISS index is resident in each actor, through the file mapping ...
        assert m["index_rss"] >= 0.9 * faiss_size, m
        # ... as pages both map, none of them private to one actor,
        assert m["index_private"] < 0.1 * faiss_size, m
        # and the actor's private memory grew by less than the index it searched (a copy of
        # the index would add all of it, besides the worker's own working memory).
        assert m["uss"] - before < faiss_size, (m, before, faiss_size)
