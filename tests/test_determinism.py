"""Guarantees 2 and 3, the same answer everywhere: with a fixed seed, `--runner local`, local Ray
(`--runner ray`) and a real two-node Ray cluster write the same rows, in the same order, and so
does a cluster run during which a Ray worker is SIGKILLed (Ray restarts the actor and retries its
batch; pipeline/executors/ray.py sets the restarts and retries explicitly).

The cluster is started here with the venv's `ray start` on loopback (a head and a second node,
2 CPUs each, a private temp dir, free ports and its own auth token) and stopped by the pids of
its own processes — never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import time

import psutil
import pytest

from resilience import RayCluster, Run, Watcher, assert_same_rows, leftovers, mine_cmd, reference_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_beir):
    return reference_run(tmp_path_factory, small_beir)


@pytest.fixture(scope="module")
def cluster():
    cluster = RayCluster(cpus_per_node=2)
    try:
        cluster.start()
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"could not start a two-node Ray cluster on loopback: {err}")
    try:
        yield cluster
    finally:
        pids = cluster.stop()
        time.sleep(1)
        assert pids and not cluster.alive(), f"cluster processes survived: {cluster.alive()}"


def test_local_ray_writes_the_rows_of_the_local_runner(small_beir, reference, tmp_path):
    ref_out, _, _ = reference
    out = tmp_path / "out"
    # workers=1: Ray workers embed even where the machine has room for only one (which the
    # default would leave to the driver, tests/test_ray_executor.py).
    run = Run(mine_cmd(small_beir, out, tmp_path / "work", "--runner", "ray", "--set", "workers=1"), tmp_path, "ray")
    assert run.wait() == 0, run.stderr[-3000:]
    assert "ray: started a local Ray" in run.stderr, run.stderr[-3000:]
    assert_same_rows(out, ref_out)


def test_two_node_cluster_writes_the_rows_of_the_local_runner(small_beir, reference, cluster, tmp_path):
    ref_out, _, _ = reference
    out = tmp_path / "out"
    run = Run(mine_cmd(small_beir, out, tmp_path / "work", "--runner", "ray", "--ray-address", cluster.address),
              tmp_path, "cluster", **cluster.env)
    assert run.wait() == 0, run.stderr[-3000:]
    assert "ray: joined 127.0.0.1" in run.stderr
    assert_same_rows(out, ref_out)


def test_cluster_run_survives_a_killed_worker_with_the_same_rows(small_beir, reference, cluster, tmp_path):
    """A corpus-embedding worker is SIGKILLed in the middle of its batch (the test hook
    HARDNEG_TEST_BATCH_DELAY holds each batch 6 s and names the worker's pid in a marker file):
    Ray starts a new worker, the batch runs again, and the rows are those of the local runner."""
    ref_out, _, _ = reference
    work, out, marks = tmp_path / "work", tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    watcher = Watcher(work, [out])
    watcher.start()
    run = Run(mine_cmd(small_beir, out, work, "--runner", "ray", "--ray-address", cluster.address),
              tmp_path, "cluster-fault", HARDNEG_TEST_BATCH_DELAY="embed_corpus:6", HARDNEG_TEST_MARK_DIR=str(marks),
              **cluster.env)
    try:
        run.wait_until(lambda: any(marks.iterdir()), timeout=600, what="an embed_corpus worker starting a batch")
        first = next(marks.iterdir())
        victim = psutil.Process(int(first.name.rsplit("-", 1)[1]))
        assert victim.pid in {w.pid for w in cluster.workers("MapWorker")}, "the marked process is not one of our workers"
        assert not any(work.glob("embed_corpus-*")), "the stage finished before the kill"
        victim.kill()
        psutil.wait_procs([victim], timeout=10)
        assert run.wait() == 0, run.stderr[-3000:]
    finally:
        watcher.stop()
        if run.proc.poll() is None:
            run.kill()
    retried = [m for m in marks.iterdir() if m != first]
    assert retried, "the killed worker's batch never ran again"
    assert not watcher.violations, watcher.violations[:10]
    assert_same_rows(out, ref_out)
    assert leftovers(work) == []
