"""What a user sees: the README's quick-start mine command, run with the default runner (local
Ray) in a real pseudo-terminal, prints one line per stage (with a live progress bar for the long
ones) and the summary — at most 40 lines, no warning, no error, no traceback, none of Ray's own
reports. And a warm re-run whose model stages are all reused imports neither torch nor ray.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from helpers import cranfield_subset
from resilience import ROOT, done_stages, env, reused_stages

pytestmark = pytest.mark.slow

# The stages that stream rows through workers and draw a progress bar.
LONG_STAGES = ("embed_queries", "embed_corpus", "candidates")


def run_in_terminal(cmd: list[str], timeout: float = 900, columns: int = 120) -> tuple[int, str]:
    """Run `cmd` with stdin, stdout and stderr on a pseudo-terminal (as in a user's shell) and
    return its exit code and everything it printed, with the terminal's \\r\\n made \\n."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env(), cwd=ROOT, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    ended_at = None
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{cmd} ran past {timeout}s:\n{b''.join(chunks).decode(errors='replace')[-3000:]}")
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                # The run ended; a process it started may still hold the terminal open.
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > 3:
                    break
    finally:
        os.close(master)
    rc = proc.wait(60)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return rc, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # colours and cursor moves: not text


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    beir = cranfield_subset(root / "beir", n_queries=12, n_docs=60)
    out = root / "out" / "cranfield"
    # The README's quick-start mine command, on the subset (the default runner: local Ray).
    cmd = [sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(beir), "--out", str(out),
           "--positives", "best", "--num-negatives", "5"]
    rc, text = run_in_terminal(cmd)
    (root / "terminal.txt").write_text(text)  # for a look when a test below fails
    return {"beir": beir, "out": out, "cmd": cmd, "rc": rc, "text": text}


def test_quick_start_prints_a_short_clean_terminal(quickstart):
    text = quickstart["text"]
    assert quickstart["rc"] == 0, text[-3000:]
    lines = [line for line in text.split("\n") if line.strip()]
    assert len(lines) <= 40, f"{len(lines)} lines:\n{text}"
    for word in ("WARNING", "Deprecat", "Error", "Traceback"):
        assert word not in text, f"{word!r} printed:\n{text}"
    ran = done_stages(text)
    assert {"ingest", "embed_queries", "embed_corpus", "index", "candidates", "filter", "sample", "write"} <= ran, text
    for stage in ran:
        # One line per stage once it ends (what the terminal keeps)...
        finals = [line.rsplit("\r", 1)[-1] for line in lines]
        assert sum(1 for line in finals if re.match(rf"{stage}\s+done\s+\(", line)) == 1, (stage, text)
    for stage in LONG_STAGES:
        # ... and, while a long stage runs, its bar: percent, rows done of all, rows/s, ETA.
        assert re.search(rf"{stage}\s+\d+%\|[^|]*\| \d+/\d+ rows \[[0-9:]+<[0-9:?]+, [0-9.?]+ rows/s\]", text), (stage, text)
    from hardneg.stages.base import local_cpus
    from hardneg.stages.embed import default_threads

    if local_cpus() // default_threads() > 1:
        assert "ray: started a local Ray" in text
    else:  # room for one model worker: the driver embeds, and Ray is not started for nothing
        assert "run here:" in text and "started a local Ray" not in text, text
    assert "hardneg wrote 12 rows" in text


def test_warm_rerun_with_a_new_threshold_imports_neither_torch_nor_ray(quickstart, tmp_path):
    assert quickstart["rc"] == 0
    probe = (
        "import json, sys\n"
        "from hardneg.pipeline.cli import main\n"
        f"sys.argv = ['hardneg', *{quickstart['cmd'][3:]!r}, '--set', 'relative_margin=0.05']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'sentence_transformers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY=' + json.dumps(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"embed_queries", "embed_corpus", "candidates"} <= reused_stages(proc.stderr), proc.stderr
    assert "filter" in done_stages(proc.stderr), proc.stderr
    heavy = json.loads(proc.stdout.split("HEAVY=")[1].splitlines()[0])
    assert heavy == [], f"a warm run imported {heavy}"


def test_a_model_that_fails_on_a_ray_worker_is_one_line_and_ray_logs_to_the_work_dir(tmp_path_factory, tmp_path):
    """Weights truncated: the model fails to load inside a Ray worker; the run still ends in one
    line and exit code 2 (the worker's exception travels back as the cause), no traceback, and
    Ray's own log lines are in WORK/.ray.log."""
    import shutil

    from resilience import tiny_model

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model(tmp_path_factory), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    beir = cranfield_subset(tmp_path / "beir", n_queries=3, n_docs=5)
    work, out = tmp_path / "work", tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(beir), "--out", str(out),
                           "--work-dir", str(work), "--model", str(broken), "--runner", "ray", "--set", "workers=1"],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("hardneg: error: ") and "cannot be loaded" in lines[-1], proc.stderr
    assert not any("WARNING" in line or "Error" in line for line in lines[:-1]), proc.stderr
    assert (work / ".ray.log").is_file() and "ray session" in (work / ".ray.log").read_text()
    assert not out.exists()
