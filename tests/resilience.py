"""Shared by the "never lose a pair" tests (test_resume, test_determinism, test_lock,
test_hostile): run `hardneg mine` as a real subprocess, kill it, watch its work dir for anything
half-written, read outputs back, and start/stop a private two-node Ray cluster on loopback.

Every run here mines the 30-query Cranfield subset (`helpers.cranfield_subset`) with
`max_seq_length=32`, which keeps one uninterrupted run around a minute on a busy 2-core machine.
"""

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
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

# One configuration for every run that is compared with another.
MINE_ARGS = ["--positives", "all", "--num-negatives", "5", "--format", "n-tuple", "--seed", "7",
             "--set", "max_seq_length=32"]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    out.pop("HARDNEG_TEST_PAUSE_AT", None)
    out.pop("RAY_ADDRESS", None)
    out.update(extra)
    return out


def mine_cmd(beir: Path, out: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(beir), "--out", str(out),
            "--work-dir", str(work), *MINE_ARGS, *extra]


class Run:
    """A `hardneg mine` subprocess whose stdout/stderr go to files (read while it runs)."""

    def __init__(self, cmd: list[str], log_dir: Path, name: str, **env_extra: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.cmd = cmd
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.started = time.monotonic()
        # SIGINT as a terminal gives it: a pytest started in the background (nohup, `&` without
        # job control) ignores SIGINT, and a child would inherit that, so Ctrl-C tests hang.
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, env=env(**env_extra), cwd=ROOT,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.orphans: list[psutil.Process] = []

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.cmd} ran past {timeout}s:\n{self.stderr[-3000:]}") from None
        self._close()
        return rc

    def _close(self) -> None:
        for handle in (self._out, self._err):
            if not handle.closed:
                handle.close()

    def kill(self, grace: float = 5.0) -> list[psutil.Process]:
        """SIGKILL the run; returns the processes it had started that are still alive `grace`
        seconds later. A local Ray's agents and workers notice their raylet died on their own
        schedule (up to about a minute here): `reap()` later checks they did go."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close()
        _, alive = psutil.wait_procs(tree, timeout=grace)
        self.orphans = alive
        return alive

    def reap(self, timeout: float = 120.0) -> list[str]:
        """Wait for the killed run's orphans to exit; kill (by pid) and return any still alive."""
        _, alive = psutil.wait_procs(getattr(self, "orphans", []), timeout=timeout)
        leaked = []
        for proc in alive:
            try:
                leaked.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return leaked

    def wait_for_stderr(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.stderr)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.stderr[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.stderr[-3000:]}")

    def wait_until(self, predicate, timeout: float = 600, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (rc {self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout}s:\n{self.stderr[-3000:]}")


def reused_stages(stderr: str) -> set[str]:
    """Stages whose log line says "reused" (the runner logs `<stage>  reused  (<fp>)`)."""
    return set(re.findall(r"(\w+)\s+reused\s+\([0-9a-f]{12}\)", stderr))


def done_stages(stderr: str) -> set[str]:
    return set(re.findall(r"(\w+)\s+done\s+\([0-9a-f]{12}\)", stderr))


# ---------------------------------------------------------------------------- outputs
def output_table(out: Path) -> pa.Table:
    """The output dataset's rows as one Arrow table (save_to_disk folder)."""
    import datasets

    return datasets.load_from_disk(str(out)).data.table


def assert_same_rows(a: Path, b: Path) -> None:
    left, right = output_table(a), output_table(b)
    assert left.column_names == right.column_names
    assert left.num_rows == right.num_rows, (left.num_rows, right.num_rows)
    if not left.equals(right):
        for i, (x, y) in enumerate(zip(left.to_pylist(), right.to_pylist())):
            if x != y:
                diff = {k: (x[k], y[k]) for k in x if x[k] != y[k]}
                raise AssertionError(f"row {i} differs: {str(diff)[:1500]}")
        raise AssertionError("tables differ")
    stats_a = json.loads((a / "stats.json").read_text())
    stats_b = json.loads((b / "stats.json").read_text())
    for key in ("input_pairs", "output_pairs", "rejected_pairs", "scores"):
        assert stats_a[key] == stats_b[key], key


def stage_folders(work: Path) -> dict[str, dict]:
    """Committed stage folders: name -> (manifest bytes, folder inode, manifest mtime)."""
    out = {}
    for entry in sorted(Path(work).iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        manifest = entry / "manifest.json"
        out[entry.name] = {"manifest": manifest.read_bytes(), "inode": entry.stat().st_ino,
                           "mtime": manifest.stat().st_mtime_ns}
    return out


def stage_of(folder: str) -> str:
    return folder.rsplit("-", 1)[0]


# ---------------------------------------------------------------------------- the watcher
class Watcher(threading.Thread):
    """Polls a work dir and an output folder while runs go on and records every moment a
    folder under its final name is incomplete: a stage folder without a valid manifest naming
    it, a Parquet shard or .npy that does not read, an output without hardneg.json/stats.json
    or with an unreadable Arrow file. Temp folders (`.tmp-*`) may hold anything."""

    def __init__(self, work: Path, outs: list[Path], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.work = Path(work)
        self.outs = [Path(o) for o in outs]
        self.interval = interval
        self.violations: list[str] = []
        self.polls = 0
        self.seen: set[str] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.check_once()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
        self.check_once()

    def _violation(self, where: Path, what: str) -> None:
        # Something that vanished while being read was replaced, not half-written.
        if where.exists():
            self.violations.append(f"{where}: {what}")

    def check_once(self) -> None:
        self.polls += 1
        if self.work.is_dir():
            for entry in list(self.work.iterdir()):
                if entry.name.startswith("."):
                    continue
                try:
                    self._check_stage(entry)
                except FileNotFoundError:
                    if entry.exists():
                        self._violation(entry, "a file vanished from a committed folder")
        for out in self.outs:
            if out.exists():
                try:
                    self._check_out(out)
                except FileNotFoundError:
                    pass

    def _check_stage(self, entry: Path) -> None:
        if not entry.is_dir():
            return self._violation(entry, "not a folder")
        manifest = entry / "manifest.json"
        try:
            data = json.loads(manifest.read_text())
        except FileNotFoundError:
            return self._violation(entry, "no manifest.json")
        except ValueError as err:
            return self._violation(entry, f"half-written manifest ({err})")
        if entry.name != f"{data.get('stage')}-{str(data.get('fingerprint'))[:16]}":
            return self._violation(entry, "manifest names another stage/fingerprint")
        if entry.name not in self.seen:
            self.seen.add(entry.name)
            self._check_files(entry)

    def _check_files(self, folder: Path) -> None:
        import numpy as np

        for path in folder.rglob("*"):
            try:
                if path.suffix == ".parquet":
                    pq.read_table(path)
                elif path.suffix == ".arrow":
                    with pa.OSFile(str(path)) as source:
                        pa.ipc.open_file(source).read_all()
                elif path.suffix == ".npy":
                    np.load(path, mmap_mode="r")
                elif path.suffix == ".json":
                    json.loads(path.read_text())
            except FileNotFoundError:
                raise
            except Exception as err:  # noqa: BLE001 - any unreadable file is the finding
                self._violation(path, f"unreadable ({err.__class__.__name__}: {err})")

    def _check_out(self, out: Path) -> None:
        for name in ("hardneg.json", "stats.json", "dataset_info.json", "state.json"):
            try:
                json.loads((out / name).read_text())
            except FileNotFoundError:
                return self._violation(out, f"output without {name}")
            except ValueError as err:
                return self._violation(out, f"half-written {name} ({err})")
        key = f"out:{json.loads((out / 'hardneg.json').read_text()).get('fingerprint')}"
        if key in self.seen:
            return
        self.seen.add(key)
        for arrow in out.glob("*.arrow"):
            try:
                with pa.memory_map(str(arrow)) as source:
                    pa.ipc.open_stream(source).read_all()
            except FileNotFoundError:
                raise
            except Exception as err:  # noqa: BLE001
                self._violation(arrow, f"unreadable ({err.__class__.__name__}: {err})")
        for path in out.rglob("*.parquet"):
            try:
                pq.read_table(path)
            except FileNotFoundError:
                raise
            except Exception as err:  # noqa: BLE001
                self._violation(path, f"unreadable ({err.__class__.__name__}: {err})")


def leftovers(folder: Path) -> list[str]:
    """Temp folders/files left in `folder` (by a crashed or failed run)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".tmp-")) if Path(folder).is_dir() else []


# ---------------------------------------------------------------------------- Ray cluster
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """A head and a worker node, both `ray start`ed from the venv on loopback, with a private
    temp dir and free ports, so nothing collides with another Ray on the machine. Stopped by
    the pids of its own processes (never `ray stop`, which would stop every Ray here)."""

    def __init__(self, cpus_per_node: int = 2) -> None:
        # Ray's socket paths must stay short: not under pytest's long tmp paths.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="hnray", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus = cpus_per_node
        self.pids: set[int] = set()
        # Ray >= 2.5x turns on token authentication for new clusters and would otherwise read (or
        # create) ~/.ray/auth_token, shared with every other Ray on the machine: this cluster gets
        # its own token, and everything that talks to it gets `self.env`.
        import secrets

        token = self.temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}

    def _start(self, *args: str) -> None:
        ports = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
        cmd = [RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *ports]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(**self.env), timeout=180)
        self._collect()
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {proc.stderr[-3000:]}")

    def start(self) -> "RayCluster":
        self._start("--head", "--port", str(self.port), "--include-dashboard=false",
                    "--min-worker-port", "0", "--max-worker-port", "0")
        self._start("--address", self.address, "--min-worker-port", "0", "--max-worker-port", "0")
        self.wait_nodes(2)
        return self

    def _collect(self) -> set[int]:
        """Our processes: everything whose command line names our temp dir or GCS address,
        and all their descendants (workers retitle themselves `ray::...`)."""
        marker_a, marker_b = str(self.temp_dir), f"127.0.0.1:{self.port}"
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                line = " ".join(proc.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if (marker_a in line or f"gcs-address={marker_b}" in line or f"--address={marker_b}" in line) and proc.pid != os.getpid():
                self.pids.add(proc.pid)
        for pid in list(self.pids):
            try:
                self.pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return self.pids

    def raylets(self) -> list[psutil.Process]:
        out = []
        for pid in self._collect():
            try:
                proc = psutil.Process(pid)
                if "raylet" in proc.name() or any("/raylet" in part for part in proc.cmdline()[:1]):
                    out.append(proc)
            except psutil.NoSuchProcess:
                pass
        return out

    def workers(self, title: str) -> list[psutil.Process]:
        """Live worker processes of this cluster whose title contains `title`."""
        out = []
        for raylet in self.raylets():
            try:
                for child in raylet.children(recursive=True):
                    if title in " ".join(child.cmdline()):
                        out.append(child)
            except psutil.NoSuchProcess:
                pass
        return out

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run([RAY, "status", "--address", self.address], capture_output=True, text=True,
                                  env=env(**self.env), timeout=60)
            if proc.returncode == 0 and proc.stdout.count("node_") >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"the cluster at {self.address} did not reach {n} nodes: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")

    def stop(self) -> list[int]:
        """SIGTERM then SIGKILL our processes, by pid; returns the pids that were stopped."""
        self._collect()
        procs = []
        for pid in self.pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        # A second sweep: anything spawned while we were stopping.
        before = set(self.pids)
        self._collect()
        for pid in self.pids - before:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return sorted(self.pids)

    def alive(self) -> list[int]:
        out = []
        for pid in self.pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------- the reference
_REFERENCE: dict[str, tuple[Path, Path, Path, str]] = {}


def reference_run(tmp_path_factory, beir: Path) -> tuple[Path, Path, str]:
    """One uninterrupted `--runner local` run of the shared configuration (cached per session):
    (output folder, work dir, stderr)."""
    if "local" not in _REFERENCE:
        root = tmp_path_factory.mktemp("reference")
        run = Run(mine_cmd(beir, root / "out", root / "work", "--runner", "local"), root, "reference")
        rc = run.wait(900)
        assert rc == 0, run.stderr[-3000:]
        _REFERENCE["local"] = (root / "out", root / "work", root, run.stderr)
    out, work, _, stderr = _REFERENCE["local"]
    return out, work, stderr


def copy_work(work: Path, target: Path) -> Path:
    shutil.copytree(work, target, ignore=shutil.ignore_patterns(".lock", ".tmp-*"))
    return target


# ---------------------------------------------------------------------------- a tiny model
_TINY: dict[str, Path] = {}


def tiny_model(tmp_path_factory) -> Path:
    """A sentence-transformers model with MiniLM's tokenizer and a randomly initialised
    (seeded) one-layer, 16-dimensional BERT: embeds in microseconds, so property tests can run
    the whole pipeline per example. Made once per session, offline."""
    if "model" not in _TINY:
        import torch
        from sentence_transformers import SentenceTransformer, models
        from transformers import AutoTokenizer, BertConfig, BertModel

        from hardneg.stages.models import resolve_model

        root = tmp_path_factory.mktemp("tiny-model")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2"))
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=512)
        BertModel(config).save_pretrained(root / "hf")
        tokenizer.save_pretrained(root / "hf")
        word = models.Transformer(str(root / "hf"), max_seq_length=64)
        model = SentenceTransformer(modules=[word, models.Pooling(16), models.Normalize()], device="cpu")
        model.save(str(root / "st"))
        _TINY["model"] = root / "st"
    return _TINY["model"]


def cli_in_process(args: list[str]) -> tuple[int, str]:
    """`hardneg ARGS` through the real entry point (pipeline.cli.main) in this process: (exit
    code, stderr). An exception main() does not turn into a one-line error propagates."""
    import contextlib
    import io
    from unittest import mock

    from hardneg.pipeline.cli import main

    # `-q` turns progress bars off through environment variables that libraries read when first
    # imported; in this process they may have been imported already.
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    err, out = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["hardneg", *args]), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, err.getvalue()
