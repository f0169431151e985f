"""The work dir: one folder per (stage, fingerprint), written atomically, plus a lock.

A stage's output is built in a temp folder beside its final place and renamed into place only
after its manifest is written, so a folder that exists under its final name is complete; a
crash leaves at most a temp folder, which the next run removes. The fingerprint covers
everything that changes the output (the stage's config, model identity, upstream fingerprints,
schema and code versions), so a re-run reuses exactly what is still valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from hardneg import schemas
from hardneg.pipeline.errors import LockedError

CODE_VERSION = "0.1.0"
MANIFEST = "manifest.json"


def fingerprint(stage_name: str, stage_version: str, config: dict[str, Any], upstream: list[str]) -> str:
    payload = json.dumps(
        {"stage": stage_name, "version": stage_version, "config": config, "upstream": upstream,
         "schema": schemas.SCHEMA_VERSION, "code": CODE_VERSION},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def default_work_dir(out: Path) -> Path:
    """Where a run caches its stages when no work dir is given: beside the output, never in it."""
    return Path(out).resolve().parent / ".hardneg-work"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileLock:
    """An exclusive, non-blocking flock on `path`; the second holder is told who has it."""

    def __init__(self, path: Path, what: str, wait_seconds: float = 0.0) -> None:
        self.path = path
        self.what = what
        self.wait_seconds = wait_seconds
        self._handle = None

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    handle.close()
                    raise LockedError(f"{self.what} is in use by another hardneg run ({holder}); wait for it or use another folder") from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class WorkDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def lock(self, wait_seconds: float = 0.0) -> FileLock:
        return FileLock(self.root / ".lock", f"work dir {self.root}", wait_seconds)

    def path(self, stage: str, fp: str) -> Path:
        return self.root / f"{stage}-{fp[:16]}"

    def is_done(self, stage: str, fp: str) -> bool:
        manifest = self.path(stage, fp) / MANIFEST
        if not manifest.is_file():
            return False
        try:
            return json.loads(manifest.read_text()).get("fingerprint") == fp
        except (OSError, ValueError):
            return False

    def manifest(self, stage: str, fp: str) -> dict[str, Any]:
        return json.loads((self.path(stage, fp) / MANIFEST).read_text())

    def new_temp(self, stage: str) -> Path:
        tmp = self.root / f".tmp-{stage}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, stage: str, fp: str, manifest: dict[str, Any]) -> Path:
        final = self.path(stage, fp)
        commit_dir(tmp, final, {**manifest, "stage": stage, "fingerprint": fp})
        return final

    def clean_temps(self) -> int:
        """Remove what crashed runs left half-written (only ever temp folders)."""
        removed = 0
        if self.root.is_dir():
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        return removed


def commit_dir(tmp: Path, final: Path, manifest: dict[str, Any], name: str = MANIFEST) -> None:
    """Write the manifest last, then rename the folder into place (replacing an old one)."""
    write_json_atomic(tmp / name, manifest)
    _fsync_dir(tmp)
    if final.exists():
        trash = final.with_name(f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
