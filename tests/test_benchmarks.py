"""The benchmark scripts run and print what they promise (their figures are recorded in
benchmarks/RESULTS.md; nothing here times anything)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scale_quick_prints_every_stage_with_memory_and_recall() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "10,000 documents x 1,000 queries" in out
    rows = dict(re.findall(r"^(\w+)\s+[\d.]+\s+([\d.]+)$", out, re.M))
    for stage in ("ingest", "query_vectors", "corpus_vectors", "index", "bm25_index", "candidates", "filter",
                  "sample", "write"):
        assert stage in rows, out
        assert 0.05 < float(rows[stage]) < 4.0  # peak RSS in GiB, measured from /proc
    recall = float(re.search(r"recall@100 ([\d.]+)", out).group(1))
    assert recall >= 0.95
