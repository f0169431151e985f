"""Shared fixtures. Embedding the Cranfield corpus takes minutes on a 2-core CPU, so the suite
mines it once (under local Ray, as users run it) and hands copies of that warm work dir to the
tests that need the full collection; every cached stage is still fingerprint-checked."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from helpers import CRANFIELD, cranfield_subset  # noqa: E402


@pytest.fixture(scope="session")
def cranfield() -> Path:
    return CRANFIELD


@pytest.fixture(scope="session")
def cranfield_run(tmp_path_factory):
    """The README's main command, run once: `hardneg mine --beir examples/cranfield --out OUT
    --num-negatives 5 --format n-tuple --positives best` (Ray runner)."""
    from hardneg import MineConfig, run_mine

    root = tmp_path_factory.mktemp("cranfield")
    config = MineConfig(beir=CRANFIELD, out=root / "out", work_dir=root / "work", num_negatives=5,
                        format="n-tuple", positives="best", runner="ray")
    result = run_mine(config, progress=False)
    return result


@pytest.fixture
def warm_work_dir(cranfield_run, tmp_path) -> Path:
    """A private copy of the session's Cranfield work dir: cached embeddings, fresh lock."""
    target = tmp_path / "work"
    shutil.copytree(cranfield_run.work_dir, target, ignore=shutil.ignore_patterns(".lock", ".tmp-*"))
    return target


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory) -> Path:
    """30 Cranfield queries, their judged documents and 200 more: embeds in seconds."""
    return cranfield_subset(tmp_path_factory.mktemp("small") / "beir")
