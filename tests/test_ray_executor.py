"""Where the Ray runner computes a stage on one machine: a local Ray starts workers only where
the machine has room for more than one of them; with room for one, that worker would only take
the driver's place after Ray's start had cost seconds of the same cores, so the driver computes
the stage, and a run whose stages all fit that rule never starts Ray (yet writes the rows the
in-process runner writes). `workers: N` asks for Ray workers anyway (tests/test_determinism.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hardneg.pipeline.executors.ray import RayExecutor
from hardneg.stages.base import MapStage, Resources, local_cpus
from hardneg.stages.embed import default_threads
from helpers import cranfield_subset
from resilience import ROOT, env


class ModelStage(MapStage):
    name = "model_stage"
    stateful = True

    def __init__(self, **resources) -> None:
        super().__init__()
        self.resources = Resources(**resources)


def test_room_for_one_worker_is_the_driver_and_a_worker_count_asked_for_is_kept():
    cpus = local_cpus()
    local = RayExecutor(progress=False)
    assert local.in_driver(ModelStage(num_cpus=cpus))  # one worker would fill the machine
    assert not local.in_driver(ModelStage(num_cpus=cpus, max_workers=1))  # `workers: 1` asked for
    assert not local.in_driver(ModelStage(num_cpus=cpus, num_gpus=1.0))  # the worker holds the GPU
    assert not RayExecutor(address="127.0.0.1:6379", progress=False).in_driver(ModelStage(num_cpus=cpus))
    if cpus >= 2:
        assert not local.in_driver(ModelStage(num_cpus=1))  # room for `cpus` workers of one thread


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_threads_and_placement_count_the_cpus_this_process_may_use():
    """A process pinned to fewer CPUs than the host has (taskset, a container's cpuset) sizes its
    threads and its Ray placement by the CPUs it may use, one count for both."""
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert local_cpus() == 1
        assert default_threads() == 1
        assert RayExecutor(progress=False).in_driver(ModelStage(num_cpus=default_threads()))
    finally:
        os.sched_setaffinity(0, allowed)
    assert local_cpus() == len(allowed)
    assert default_threads() == min(4, len(allowed))


@pytest.mark.slow
def test_a_default_run_with_room_for_one_worker_never_starts_ray_and_writes_the_local_rows(tmp_path):
    if local_cpus() // default_threads() > 1:
        pytest.skip("this machine has room for several model workers: the default run uses Ray")
    beir = cranfield_subset(tmp_path / "beir", n_queries=8, n_docs=40)
    probe = (
        "import sys, datasets, hardneg\n"
        "rows = {}\n"
        "for runner in ('ray', 'local'):\n"
        f"    out = {str(tmp_path)!r} + '/out-' + runner\n"
        f"    hardneg.mine(beir={str(beir)!r}, out=out, work_dir={str(tmp_path)!r} + '/work-' + runner, positives='best',\n"
        "                 num_negatives=3, max_seq_length=32, runner=runner)\n"
        "    rows[runner] = datasets.load_from_disk(out).to_list()\n"
        "    if runner == 'ray':\n"
        "        print('RAY_IMPORTED=' + str('ray' in sys.modules))\n"
        "print('SAME=' + str(rows['ray'] == rows['local']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAY_IMPORTED=False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "SAME=True" in proc.stdout, proc.stdout


GPU_STAGES = '''
import os, sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq, ray
from hardneg.pipeline.executors.ray import RayExecutor
from hardneg.stages.base import MapStage, Resources
from hardneg.stages.io import read_table

class GpuStage(MapStage):
    stateful = True
    def __init__(self, name):
        super().__init__()
        self.name = name
        self.resources = Resources(num_cpus=1, num_gpus=1.0, batch_size=4)
    def transform(self, batch):
        return batch.append_column("worker", pa.array([os.getpid()] * batch.num_rows))

tmp = Path(sys.argv[1])
(tmp / "in").mkdir()
pq.write_table(pa.table({"x": list(range(40))}), tmp / "in" / "part-00000.parquet")
ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="ERROR")  # one GPU (declared)
runner = RayExecutor(progress=False)
first, second = GpuStage("first"), GpuStage("second")
runner.prepare([first, second])
for stage in (first, second):
    rows = runner.run_map(stage, tmp / "in", tmp / stage.name)
    workers = set(read_table(tmp / stage.name).column("worker").to_pylist())
    print(stage.name, rows, len(workers))
runner.close()
'''


@pytest.mark.slow
def test_stages_that_hold_a_gpu_share_a_one_gpu_machine_one_worker_at_a_time(tmp_path):
    # 4 CPUs and one GPU: a pool sized by CPUs would have four GPU workers, three never placed,
    # and two pools started together could hold the GPU each other waits for. Either way the run
    # waited for ever (seen on an H200: embedding and the index search on the one GPU).
    proc = subprocess.run([sys.executable, "-c", GPU_STAGES, str(tmp_path)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["first 40 1", "second 40 1"], proc.stdout + proc.stderr[-2000:]
