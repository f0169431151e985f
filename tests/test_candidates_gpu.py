"""Under Ray a worker sees only the GPUs it requests: the candidates stage requests one when its
index will search on a GPU (`index.gpu` on, or auto with a usable GPU), says so in the run log,
and its actors then really search on the GPU."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.shared_index import Probe, build, candidates_stage  # noqa: E402
from hardneg.stages.engines.faiss_index import IndexConfig, gpu_available  # noqa: E402


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gpu"), 5_000, n_queries=16)


@pytest.mark.skipif(gpu_available(), reason="a GPU is available here")
def test_without_a_gpu_the_actors_request_none_and_the_log_says_cpu(small_index, caplog):
    index_dir, bm25_dir, _, bm25_config, _ = small_index
    with caplog.at_level(logging.INFO, logger="hardneg"):
        stage = candidates_stage(index_dir, bm25_dir, IndexConfig(index="Flat", gpu="auto"), bm25_config)
    assert stage.search_device == "cpu" and stage.resources.num_gpus == 0
    assert "the index searches on cpu" in caplog.text
    # gpu "on" asks for one whatever the driver sees: on a cluster the GPUs may be elsewhere.
    on = candidates_stage(index_dir, bm25_dir, IndexConfig(index="Flat", gpu="on"), bm25_config)
    assert on.search_device == "gpu" and on.resources.num_gpus == 1
    off = candidates_stage(index_dir, bm25_dir, IndexConfig(index="Flat", gpu="off"), bm25_config)
    assert off.resources.num_gpus == 0


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not gpu_available(), reason="needs faiss GPU support and a visible GPU")
def test_candidates_actors_search_on_the_gpu_under_ray(small_index, caplog):
    import ray

    index_dir, bm25_dir, _, bm25_config, queries = small_index
    with caplog.at_level(logging.INFO, logger="hardneg"):
        stage = candidates_stage(index_dir, bm25_dir, IndexConfig(index="Flat", gpu="auto"), bm25_config)
    assert stage.search_device == "gpu" and stage.resources.num_gpus == 1
    assert "the index searches on gpu" in caplog.text
    cpu = candidates_stage(index_dir, bm25_dir, IndexConfig(index="Flat", gpu="off"), bm25_config)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        # The resources the Ray runner gives the stage's actors (pipeline/executors/ray.py).
        actor = ray.remote(num_cpus=1, num_gpus=stage.resources.num_gpus)(Probe).remote(stage)
        assert ", gpu" in ray.get(actor.searched_on.remote())
        assert ray.get(actor.mine.remote(queries))[2] == queries.num_rows
    finally:
        ray.shutdown()
    # An exact index on the GPU finds what the CPU finds (scores are rescored exactly anyway).
    gpu_ids = stage(queries).column("candidate_ids").to_pylist()
    assert [set(c[:20]) for c in gpu_ids] == [set(c[:20]) for c in cpu(queries).column("candidate_ids").to_pylist()]
