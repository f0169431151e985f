"""Unit tests of the work-dir store (pipeline/store.py): fingerprints, atomic commits, temps."""

from __future__ import annotations

import json

import pytest

from hardneg.pipeline.store import MANIFEST, WorkDir, commit_dir, fingerprint


def test_fingerprint_changes_with_every_input_and_nothing_else():
    base = fingerprint("embed_corpus", "1", {"model": "m", "precision": "fp32"}, ["abc"])
    assert base == fingerprint("embed_corpus", "1", {"precision": "fp32", "model": "m"}, ["abc"])  # key order
    others = {
        fingerprint("embed_queries", "1", {"model": "m", "precision": "fp32"}, ["abc"]),
        fingerprint("embed_corpus", "2", {"model": "m", "precision": "fp32"}, ["abc"]),
        fingerprint("embed_corpus", "1", {"model": "m", "precision": "bf16"}, ["abc"]),
        fingerprint("embed_corpus", "1", {"model": "m", "precision": "fp32"}, ["abd"]),
        fingerprint("embed_corpus", "1", {"model": "m", "precision": "fp32"}, []),
    }
    assert base not in others and len(others) == 5
    assert len(base) == 64 and int(base, 16) >= 0


def test_commit_dir_writes_the_manifest_then_replaces_the_old_folder(tmp_path):
    final = tmp_path / "stage-x"
    first = tmp_path / ".tmp-a"
    first.mkdir()
    (first / "part-0.parquet").write_text("one")
    commit_dir(first, final, {"fingerprint": "f1"})
    assert not first.exists() and (final / "part-0.parquet").read_text() == "one"
    assert json.loads((final / MANIFEST).read_text()) == {"fingerprint": "f1"}

    second = tmp_path / ".tmp-b"
    second.mkdir()
    (second / "part-0.parquet").write_text("two")
    commit_dir(second, final, {"fingerprint": "f2"})
    assert (final / "part-0.parquet").read_text() == "two"
    assert json.loads((final / MANIFEST).read_text())["fingerprint"] == "f2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-x"]  # no temp or old folder left


def test_work_dir_is_done_only_for_a_committed_matching_manifest(tmp_path):
    work = WorkDir(tmp_path / "w")
    fp = fingerprint("ingest", "1", {}, [])
    assert not work.is_done("ingest", fp)
    tmp = work.new_temp("ingest")
    assert not work.is_done("ingest", fp)  # computed but not committed
    path = work.commit(tmp, "ingest", fp, {"info": {"rows": 3}})
    assert work.is_done("ingest", fp) and path == work.path("ingest", fp)
    assert work.manifest("ingest", fp)["info"] == {"rows": 3}
    # Another fingerprint with the same 16-character prefix is not this stage's output.
    assert not work.is_done("ingest", fp[:16] + "0" * 48)
    (path / MANIFEST).write_text("{broken")
    assert not work.is_done("ingest", fp)


def test_clean_temps_removes_only_temp_folders(tmp_path):
    work = WorkDir(tmp_path / "w")
    fp = fingerprint("ingest", "1", {}, [])
    work.commit(work.new_temp("ingest"), "ingest", fp, {})
    work.new_temp("embed_corpus")
    work.new_temp("candidates")
    assert work.clean_temps() == 2
    assert [p.name for p in (tmp_path / "w").iterdir()] == [work.path("ingest", fp).name]


@pytest.mark.parametrize("wait", [0.0, 0.6])
def test_a_held_lock_names_its_holder(tmp_path, wait):
    from hardneg.pipeline.store import LockedError

    work = WorkDir(tmp_path / "w")
    with work.lock():
        with pytest.raises(LockedError, match=r"in use by another hardneg run \(pid \d+\)"):
            # flock is per open file description: a second open in this process conflicts too.
            with work.lock(wait_seconds=wait):
                pass
    with work.lock():  # released on exit
        pass
