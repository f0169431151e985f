"""Guarantee 5, one run at a time per work dir and per output: a second `hardneg mine` on a work
dir or an output another run is using stops at once with one line and exit code 2, and the
first run completes with the rows it would have written alone."""

from __future__ import annotations

import pytest

from hardneg.pipeline.store import FileLock, LockedError, WorkDir
from resilience import Run, Watcher, assert_same_rows, copy_work, leftovers, mine_cmd, reference_run, stage_folders


def test_a_second_lock_on_the_same_work_dir_is_refused(tmp_path):
    work = WorkDir(tmp_path / "work")
    with work.lock():
        with pytest.raises(LockedError, match=r"work dir .* is in use by another hardneg run \(pid \d+\)"):
            with work.lock():
                pass
    with work.lock():  # released on exit
        pass


@pytest.mark.slow
def test_second_run_on_a_busy_work_dir_or_output_stops_and_the_first_completes(small_beir, tmp_path_factory, tmp_path):
    ref_out, ref_work, _ = reference_run(tmp_path_factory, small_beir)
    work = copy_work(ref_work, tmp_path / "work")
    out = tmp_path / "out"
    before = stage_folders(work)
    watcher = Watcher(work, [out])
    watcher.start()
    # The first run reuses every cached stage and pauses 20 s before committing its output.
    first = Run(mine_cmd(small_beir, out, work, "--runner", "local"), tmp_path, "first", HARDNEG_TEST_PAUSE_AT="write:20")
    try:
        first.wait_for_stderr(r"test hook: pausing before committing write")
        # Same work dir, another output.
        second = Run(mine_cmd(small_beir, tmp_path / "out2", work, "--runner", "local"), tmp_path, "second")
        assert second.wait(300) == 2, second.stderr[-3000:]
        # Same output, another (empty) work dir.
        third = Run(mine_cmd(small_beir, out, tmp_path / "work3", "--runner", "ray"), tmp_path, "third")
        assert third.wait(300) == 2, third.stderr[-3000:]
        assert first.proc.poll() is None, "the first run ended while the others ran"
        assert first.wait() == 0, first.stderr[-3000:]
    finally:
        watcher.stop()
        if first.proc.poll() is None:
            first.kill()
    for run, what in ((second, f"work dir {work}"), (third, f"output {out}")):
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hardneg: error: "), run.stderr[-2000:]
        assert what in lines[0] and "in use by another hardneg run (pid" in lines[0], lines[0]
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "out2").exists()
    assert not any((tmp_path / "work3").glob("*-*")), "the refused run computed a stage"
    assert stage_folders(work) == before
    assert not watcher.violations, watcher.violations[:10]
    assert_same_rows(out, ref_out)
    assert leftovers(work) == [] and leftovers(tmp_path) == []
