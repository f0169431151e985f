"""Interruption: a run stopped by Ctrl-C (SIGINT) or SIGTERM — while a stage computes, during the
final write, in-process or under Ray — exits non-zero (130 / 143) with one line saying it was
interrupted and will resume; run again, it completes, reusing the stages that had finished.

Each run is a real `hardneg mine` subprocess on a 12-document BEIR folder with the tiny random
model (tests/resilience.py), paused by the runner's test hook (`HARDNEG_TEST_PAUSE_AT`) at the
moment the signal is sent.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from resilience import Run, leftovers, reused_stages, tiny_model

WORDS = ("flow", "boundary", "layer", "shock", "wave", "heat", "transfer", "wing", "supersonic", "pressure",
         "jet", "plate", "laminar", "turbulent", "mach", "number", "viscous", "slender", "body", "cone")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("beir")
    (folder / "qrels").mkdir()
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": str(i), "text": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}"}) + "\n" for i in range(12)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": f"{WORDS[i]} wing"}) + "\n" for i in range(3)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{i}\t1\n" for i in range(3)))
    return folder


def _cmd(beir: Path, root: Path, tiny: Path, runner: str) -> list[str]:
    return [sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(beir), "--out", str(root / "out"),
            "--work-dir", str(root / "work"), "--model", str(tiny), "--runner", runner, "--num-negatives", "2"]


def _interrupt(cmd: list[str], root: Path, stage: str, signum: int) -> Run:
    run = Run(cmd + ["-q"], root, f"{stage}-{signum}", HARDNEG_TEST_PAUSE_AT=stage)
    run.wait_for_stderr(f"test hook: pausing before committing {stage}", timeout=600)
    run.proc.send_signal(signum)
    rc = run.wait(120)
    assert rc == 128 + signum, (rc, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.startswith("hardneg: ")]
    assert len(lines) == 1, run.stderr[-3000:]
    assert f"interrupted by {signal.Signals(signum).name}" in lines[0] and "resume" in lines[0], lines[0]
    assert "temp folders are cleaned by the next run" in lines[0], lines[0]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not (root / "out").exists(), "an interrupted run left an output"
    return run


def _resume(cmd: list[str], root: Path, reused: set[str]) -> None:
    run = Run(cmd, root, "resume")
    assert run.wait(600) == 0, run.stderr[-3000:]
    assert reused <= reused_stages(run.stderr), run.stderr[-3000:]
    assert (root / "out" / "hardneg.json").is_file()
    assert leftovers(root / "work") == [] and leftovers(root) == []


@pytest.mark.slow
def test_local_run_interrupted_in_a_stage_and_in_the_write_exits_nonzero_and_resumes(tmp_path, beir, tiny):
    cmd = _cmd(beir, tmp_path, tiny, "local")
    _interrupt(cmd, tmp_path, "index", signal.SIGINT)
    _interrupt(cmd, tmp_path, "write", signal.SIGTERM)
    _resume(cmd, tmp_path, {"ingest", "embed_queries", "embed_corpus", "index", "candidates", "filter", "sample"})


@pytest.mark.slow
def test_ray_run_interrupted_exits_nonzero_and_resumes(tmp_path, beir, tiny):
    """Under Ray (whose ray.init() installs its own SIGTERM handler in the driver)."""
    cmd = _cmd(beir, tmp_path, tiny, "ray")
    _interrupt(cmd, tmp_path, "embed_corpus", signal.SIGINT)
    _interrupt(cmd, tmp_path, "candidates", signal.SIGTERM)
    _resume(cmd, tmp_path, {"ingest", "embed_queries", "embed_corpus", "index"})
