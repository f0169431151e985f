"""The benchmark scripts run and print what they promise (their figures are recorded in
benchmarks/RESULTS.md; nothing here times anything)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scale_quick_prints_every_stage_with_memory_and_recall() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "10,000 documents x 1,000 queries" in out
    # stage, seconds, µs per query, µs per document, share of the stages' time, cores, peak RSS GiB
    found = re.findall(r"^(\w+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+|-)\s+([\d.]+)$", out, re.M)
    rows = {name: [float(v) if v != "-" else None for v in values] for name, *values in found}
    for stage in ("ingest", "query_vectors", "corpus_vectors", "index", "bm25_index", "candidates", "filter",
                  "sample", "write"):
        assert stage in rows, out
        seconds, per_query, per_doc, share, cores, rss = rows[stage]
        assert 0.05 < rss < 4.0  # peak RSS in GiB, measured from /proc
        # CPU seconds over wall seconds, sampled every 50 ms: "-" under half a second; a stage
        # that computes for a second keeps a core busy most of it
        assert (cores is None) == (seconds < 0.5), (stage, seconds, cores)
        assert cores is None or (cores < 8 and (seconds < 1.0 or cores > 0.3)), (stage, cores)
        # seconds are printed to 0.1 s: the per-item costs agree with them within that rounding
        assert abs(per_query - seconds / 1000 * 1e6) <= 0.05 / 1000 * 1e6 + 1  # 1,000 queries
        assert abs(per_doc - seconds / 10_000 * 1e6) <= 0.05 / 10_000 * 1e6 + 0.1  # 10,000 documents
    assert abs(sum(r[3] for r in rows.values()) - 100) < 1.0, out  # the shares add up
    recall = float(re.search(r"recall@100 ([\d.]+)", out).group(1))
    assert recall >= 0.95


def test_gpu_check_builds_and_searches_on_the_cpu_and_says_why_the_gpu_half_skipped() -> None:
    import json

    from hardneg.stages.engines.faiss_index import gpu_status

    if gpu_status()[0]:
        pytest.skip("faiss can use a GPU here: the script measures both halves")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--index-docs", "3000", "--index-queries", "50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads(proc.stdout)["index"]
    assert index["gpu_off"]["built_on"] == "cpu" and "cpu" in index["gpu_off"]["index"]
    assert index["gpu_off"]["recall@100"] == 1.0  # 3,000 vectors: an exact index
    assert index["gpu_on"] == {"skipped": gpu_status()[1]}


def test_gather_times_every_way_in_both_page_cache_states() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/gather.py", "--docs", "20000", "--dim", "64", "--rows", "2000",
                           "--gathers", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.findall(r"^(as written|read sequentially|reloaded page by page)\s+(mapped|pread|auto|numpy)\s+([\d.]+)\s+([\d.]+)\s+"
                       r"([\d.]+)\s+([\d.]+)(?: \(settled on (mapped|pread)\))?$", proc.stdout, re.M)
    assert {(state, way) for state, way, *_ in found} == {
        (state, way) for state in ("as written", "read sequentially", "reloaded page by page") for way in ("mapped", "pread", "auto", "numpy")}
    for state, way, median, low, high, per_row, settled in found:
        assert float(low) <= float(median) <= float(high)
        assert (settled != "") == (way == "auto")
