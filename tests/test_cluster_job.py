"""`hardneg mine` as a Ray job on a real two-node cluster (both nodes on this machine), submitted
through the Ray job API the way `ray job submit -- hardneg mine ... --ray-address auto` does.

The cluster is this test's own: unique ports and temp dirs, and it is stopped by killing exactly
the processes whose command line names them (never `ray stop`, which would take down every Ray
on the machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import read_qrels

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
JOB_TIMEOUT = 900


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _cluster_processes(root: Path, gcs_port: int) -> list:
    """This cluster's processes: those whose command line names its temp root or its GCS
    address, their descendants, and any Ray process (agents rename themselves `ray::...`) holding
    a file open under the temp root."""
    import psutil

    gcs = re.compile(rf"(?<![\w.])[\w.-]+:{gcs_port}(?!\d)")  # host:port, whatever address Ray picked
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        cmdline = " ".join(proc.info.get("cmdline") or [])
        mine = f"{root}/" in cmdline or bool(gcs.search(cmdline))
        if not mine and "ray" in cmdline:
            try:
                mine = any(f.path.startswith(f"{root}/") for f in proc.open_files())
            except psutil.Error:
                pass
        if mine:
            found[proc.pid] = proc
            try:
                found.update({child.pid: child for child in proc.children(recursive=True)})
            except psutil.Error:
                pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_cluster(root: Path, gcs_port: int) -> None:
    import psutil

    for _ in range(5):  # a dying raylet can still spawn a worker: sweep until none is left
        procs = _cluster_processes(root, gcs_port)
        if not procs:
            return
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)


def _client_port(port: int) -> list[str]:
    """A free Ray Client port where ray[client] is installed (its default, 10001, may be taken by
    another cluster on this machine); none otherwise (Ray refuses the option then)."""
    try:
        from ray._private.utils import get_ray_client_dependency_error

        missing = get_ray_client_dependency_error() is not None
    except ImportError:
        missing = False
    return [] if missing else [f"--ray-client-server-port={port}"]


@pytest.fixture
def ray_cluster():
    if not RAY.exists():
        pytest.skip(f"no ray CLI at {RAY}")
    # Short temp paths: Ray's Unix sockets live under them (108-byte limit).
    gcs, dashboard, client, *agent_ports = _free_ports(11)
    # Token auth off, explicitly: Ray turns it on for a head that finds ~/.ray/auth_token (left
    # by any local ray.init) but not for a joining node, which then cannot reach the GCS. The
    # cluster listens on 127.0.0.1 only. PATH: the nodes run in this venv, `hardneg` installed.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
    root = Path(tempfile.mkdtemp(prefix="hnr-", dir="/tmp"))
    common = ["--num-cpus=2", "--object-store-memory=300000000", "--disable-usage-stats"]
    head = [str(RAY), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", *_client_port(client), f"--temp-dir={root / 'h'}",
            f"--dashboard-agent-listen-port={agent_ports[0]}", f"--dashboard-agent-grpc-port={agent_ports[1]}",
            f"--runtime-env-agent-port={agent_ports[2]}", f"--metrics-export-port={agent_ports[3]}", *common]
    worker = [str(RAY), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={root / 'w'}",
              f"--dashboard-agent-listen-port={agent_ports[4]}", f"--dashboard-agent-grpc-port={agent_ports[5]}",
              f"--runtime-env-agent-port={agent_ports[6]}", f"--metrics-export-port={agent_ports[7]}", *common]
    try:
        for command in (head, worker):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "root": root}
    finally:
        _stop_cluster(root, gcs)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_nodes(gcs: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    while True:
        done = subprocess.run([sys.executable, "-c", code, gcs], capture_output=True, text=True, timeout=120, env=env)
        alive = int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0
        if alive >= n:
            return
        assert time.monotonic() < deadline, f"only {alive} of {n} Ray nodes came up: {done.stderr[-2000:]}"
        time.sleep(2)


def test_mine_as_ray_job_on_two_node_cluster(ray_cluster, small_beir, tmp_path, monkeypatch):
    import datasets
    from ray.job_submission import JobStatus, JobSubmissionClient

    _wait_for_nodes(ray_cluster["gcs"], 2)
    out = (tmp_path / "shared" / "out").resolve()  # a path every node sees (one machine here)
    entrypoint = (f"hardneg mine --beir {small_beir.resolve()} --out {out} --positives best --num-negatives 3 "
                  f"--ray-address auto -q")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    client = JobSubmissionClient(ray_cluster["address"])
    job = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    deadline = time.monotonic() + JOB_TIMEOUT
    status = client.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {JOB_TIMEOUT}s:\n{client.get_job_logs(job)[-4000:]}")
        time.sleep(3)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"job {job} {status}:\n{logs[-6000:]}"
    assert "Traceback" not in logs, logs[-6000:]

    ds = datasets.load_from_disk(str(out))
    stats = json.loads((out / "stats.json").read_text())
    n_queries = len({q for q, _, s in read_qrels(small_beir) if s > 0})
    assert ds.num_rows == stats["output_pairs"] >= 20
    assert ds.num_rows + sum(stats["rejected_pairs"].values()) == n_queries == 30
    assert {"query", "positive", "negative_1", "negative_2", "negative_3", "query_id", "negative_ids"} <= set(ds.column_names)
    judged: dict[str, set[str]] = {}
    for q, d, s in read_qrels(small_beir):
        if s > 0:
            judged.setdefault(q, set()).add(d)
    for row in ds:
        assert len(row["negative_ids"]) == 3
        assert not set(row["negative_ids"]) & judged[row["query_id"]], f"judged positive mined as negative: {row['query_id']}"
        assert all(row[f"negative_{i}"] for i in (1, 2, 3))
    assert stats["config"]["ray_address"] == "auto" and stats["config"]["runner"] == "ray"
