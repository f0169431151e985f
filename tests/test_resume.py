"""Guarantee 1, crash and resume: `hardneg mine` SIGKILLed at any point and run again ends with
exactly the rows of an uninterrupted run, recomputes no stage that had finished, and never
shows a half-written stage folder, shard, manifest or output to a reader.

Each test runs the real command line as a subprocess on the Cranfield subset and kills it:
while it embeds (found by polling the work dir for the stage's temp folder), and at the last
moment before a stage is committed — index, candidates and the final write — using the runner's
test hook `HARDNEG_TEST_PAUSE_AT=<stage>` (see pipeline/runner.py `_test_pause`). A watcher
thread polls the work dir and the output the whole time.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from resilience import (Run, Watcher, assert_same_rows, done_stages, leftovers, mine_cmd, reference_run,
                        reused_stages, stage_folders, stage_of)

pytestmark = pytest.mark.slow

PAUSED = r"test hook: pausing before committing {}"
STAGE_ORDER = re.compile(r"(\w+)\s+done\s+\([0-9a-f]{12}\)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_beir):
    return reference_run(tmp_path_factory, small_beir)


def _check_resume(before: dict[str, dict], work: Path, stderr: str) -> None:
    """Every stage folder committed before the crash is reused, byte for byte and inode for
    inode (not rewritten), and the log says so."""
    after = stage_folders(work)
    for name, snapshot in before.items():
        assert after.get(name) == snapshot, f"{name} was rewritten by the resumed run"
    assert {stage_of(n) for n in before} <= reused_stages(stderr), (sorted(before), reused_stages(stderr))
    assert not {stage_of(n) for n in before} & done_stages(stderr)


def test_local_run_killed_at_each_stage_resumes_to_the_same_rows(small_beir, reference, tmp_path):
    ref_out, ref_work, ref_log = reference
    order = STAGE_ORDER.findall(ref_log)  # the stages in the order the uninterrupted run finished them
    assert {"embed_corpus", "index", "candidates", "write"} <= set(order), order

    def before(stage: str) -> set[str]:
        return set(order[: order.index(stage)])

    work, out = tmp_path / "work", tmp_path / "out"
    cmd = mine_cmd(small_beir, out, work, "--runner", "local")
    watcher = Watcher(work, [out])
    watcher.start()
    try:
        # 1. During embedding: the corpus is being embedded into its temp folder.
        # Each corpus batch held 20 s: the kill lands mid-embedding however fast the machine.
        run = Run(cmd, tmp_path, "1-embed", HARDNEG_TEST_BATCH_DELAY="embed_corpus:20")
        run.wait_until(lambda: any(work.glob(".tmp-embed_corpus-*")), what="the embed_corpus temp folder")
        time.sleep(2.0)
        assert not run.kill(), "processes outlived the killed run"
        committed = stage_folders(work)
        assert {stage_of(n) for n in committed} == before("embed_corpus")
        assert leftovers(work), "the killed stage left no temp folder: the kill came too late"

        # 2..4. Paused (then killed) after computing index / candidates / write, before committing.
        for stage in ("index", "candidates", "write"):
            run = Run(cmd, tmp_path, f"kill-{stage}", HARDNEG_TEST_PAUSE_AT=stage)
            run.wait_for_stderr(PAUSED.format(stage))
            assert not run.kill(), "processes outlived the killed run"
            _check_resume(committed, work, run.stderr)
            committed = stage_folders(work)
            assert {stage_of(n) for n in committed} == before(stage)
            assert not out.exists(), "an output appeared before the write was committed"

        # 5. The last run finishes: only the write runs again.
        assert any(p.name.startswith(f".tmp-{out.name}-") for p in tmp_path.iterdir()), "the write left no temp folder"
        run = Run(cmd, tmp_path, "5-finish")
        assert run.wait() == 0, run.stderr[-3000:]
        _check_resume(committed, work, run.stderr)
        assert done_stages(run.stderr) == {"write"}
    finally:
        watcher.stop()
    assert not watcher.violations, watcher.violations[:10]
    assert watcher.polls > 50
    assert_same_rows(out, ref_out)
    # The same stage folders (same fingerprints) as the uninterrupted run, and no temp left over.
    assert set(stage_folders(work)) == set(stage_folders(ref_work))
    assert leftovers(work) == []
    assert leftovers(tmp_path) == [], "a crashed write left its temp folder beside the output"


def test_ray_run_killed_while_embedding_resumes_to_the_same_rows(small_beir, reference, tmp_path):
    ref_out, _, _ = reference
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = mine_cmd(small_beir, out, work, "--runner", "ray", "--set", "workers=1")  # on Ray workers
    watcher = Watcher(work, [out])
    watcher.start()
    try:
        run = Run(cmd, tmp_path, "ray-killed", HARDNEG_TEST_BATCH_DELAY="embed_corpus:20")
        run.wait_until(lambda: any(work.glob(".tmp-embed_corpus-*")), what="the embed_corpus temp folder")
        time.sleep(3.0)
        killed = run
        killed.kill()
        committed = stage_folders(work)
        assert {stage_of(n) for n in committed} == {"ingest", "embed_queries"}
        assert leftovers(work), "the killed stage left no temp folder: the kill came too late"
        run = Run(cmd, tmp_path, "ray-resumed")
        assert run.wait() == 0, run.stderr[-3000:]
        _check_resume(committed, work, run.stderr)
    finally:
        watcher.stop()
    # The killed driver's local Ray (raylet, GCS, agents, workers) goes away on its own.
    leaked = killed.reap(timeout=120)
    assert not leaked, f"the local Ray outlived its killed driver by minutes: {leaked}"
    assert not watcher.violations, watcher.violations[:10]
    assert_same_rows(out, ref_out)
    assert leftovers(work) == [] and leftovers(tmp_path) == []
