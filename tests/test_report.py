"""`hardneg report OUT --html FILE`: a self-contained page, rendered in a real headless Chromium;
and the end-of-run summary fits a terminal 100 columns wide."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HARDNEG = Path(sys.executable).parent / "hardneg"
IMG = re.compile(r'<img class="plot" alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]*)">')
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_run(small_beir):
    """A run whose filters drop candidates and leave some pairs short of negatives, so every
    plot has something to show. Beside test_hub_layout's output: same work dir, one embedding."""
    from hardneg import MineConfig, run_mine

    out = small_beir.parent / "ecosystem" / "report"
    config = MineConfig(beir=small_beir, out=out, positives="best", num_negatives=3, miners=["dense", "bm25"],
                        runner="local", range_max=8, max_score=0.5)
    return run_mine(config, progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HARDNEG), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def report_html(report_run, small_beir, tmp_path_factory) -> Path:
    html = tmp_path_factory.mktemp("report") / "report.html"
    done = _cli("report", str(report_run.out), "--beir", str(small_beir), "--html", str(html))
    assert done.returncode == 0, done.stderr
    return html


def _png_pixels(data: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


@pytest.mark.slow
def test_report_is_self_contained_with_every_plot(report_run, report_html):
    text = report_html.read_text()
    stats = report_run.stats
    assert stats["decisions"].get("max_score", 0) > 0 and stats["rejects"].get("short_of_negatives", 0) > 0
    images = IMG.findall(text)
    alts = [alt for alt, _ in images]
    assert alts == ["score distributions of positives and negatives per source", "candidates by filter decision",
                    "negatives per query", "rejects by reason"]
    for alt, data in images:
        pixels = _png_pixels(base64.b64decode(data))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 400, alt
        assert pixels[..., :3].std() > 0.05, f"blank plot: {alt}"
    # Nothing external: no scripts, stylesheets or remote images.
    assert "<script" not in text and "<link" not in text and not re.search(r'src="(?!data:)', text)
    # The tables beside the plots, and the evaluation against the qrels.
    assert "short_of_negatives" in text and "max_score" in text and "negative (bm25)" in text
    try:
        from hardneg.pipeline.outputs.evaluate import evaluate  # noqa: F401
    except ImportError:
        assert "eval unavailable" in text
    else:
        assert "False negatives, hardness, coverage" in text and "Per source" in text and "median rank" in text


def test_report_without_beir_and_errors(report_run, tmp_path):
    html = tmp_path / "plain.html"
    done = _cli("report", str(report_run.out), "--html", str(html))
    assert done.returncode == 0, done.stderr
    assert "No evaluation: give" in html.read_text() and len(IMG.findall(html.read_text())) == 4
    done = _cli("report", str(tmp_path / "missing"), "--html", str(html))
    assert done.returncode == 2 and done.stderr.startswith("hardneg: error:") and len(done.stderr.strip().splitlines()) == 1


def test_report_on_a_beir_folder_without_qrels_is_one_line_and_exit_2(report_run, small_beir, tmp_path):
    """As `hardneg eval` does: not a page saying "evaluation failed" and exit 0."""
    beir = tmp_path / "beir"
    shutil.copytree(small_beir, beir, ignore=shutil.ignore_patterns("qrels"))
    html = tmp_path / "r.html"
    done = _cli("report", str(report_run.out), "--beir", str(beir), "--html", str(html))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hardneg: error:") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "qrels" in done.stderr and not html.exists()


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (tests/run.sh installs Debian's package)")
def test_report_renders_in_headless_chromium(report_html, tmp_path):
    shot = tmp_path / "report.png"
    done = _chromium("--window-size=1200,2400", f"--screenshot={shot}", report_html.as_uri(), profile=tmp_path / "profile")
    assert shot.is_file() and shot.stat().st_size > 0, done.stderr[-2000:]
    pixels = _png_pixels(shot.read_bytes())[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 0.05, "blank screenshot"
    # The plots are drawn where they should be: colour (not just black text on white) in the page.
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 0.3).mean() > 0.01, "no coloured plot pixels in the screenshot"

    # Chromium decoded every inline image: a copy of the page reports it into the DOM it dumps.
    probe = tmp_path / "probe.html"
    probe.write_text(report_html.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => document.body.setAttribute('data-decoded', "
                   "[...document.images].filter(i => i.complete && i.naturalWidth > 100).length));</script></body>"))
    done = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(re.findall(r'<img class="plot"[^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', done.stdout)) == 4
    assert 'data-decoded="4"' in done.stdout, done.stdout[:500]


# ---------------------------------------------------------------------- the terminal summary
def _lines_fit(console) -> list[str]:
    lines = console.export_text().splitlines()
    too_long = [line for line in lines if len(line) > 100]
    assert not too_long, "\n".join(too_long)
    return lines


def test_summary_fits_100_columns(report_run):
    from rich.console import Console

    from hardneg.pipeline.outputs.summary import print_summary

    console = Console(width=100, record=True, file=io.StringIO(), force_terminal=False)
    print_summary(report_run, console)
    lines = _lines_fit(console)
    assert any(line.strip() == "Candidates by decision" for line in lines), lines
    assert any(line.strip() == "Rejects by reason" for line in lines), lines


def test_summary_fits_100_columns_with_long_names():
    from types import SimpleNamespace

    from rich.console import Console

    from hardneg.pipeline.outputs.summary import print_summary
    from hardneg.stages.base import StageResult

    score = {"count": 123456789, "mean": -12345.678901, "std": 9876.54321, "min": -99999.9999, "25%": 0.1,
             "50%": 0.2, "75%": 0.3, "max": 99999.9999}
    stats = {
        "output_rows": 10**9, "input_pairs": 10**9, "output_pairs": 10**9 - 5, "rejected_pairs": {"short_of_negatives": 5},
        "scores": {"positive": score, "negative": score},
        "scores_per_source": {"cross_encoder_with_a_long_name": score, "dense": score, "bm25": score},
        "decisions": {"kept": 10**10, "relative_margin_against_the_lowest_positive": 123456789, "near_duplicate": 5},
        "pairs_short_of_negatives": 5,
        "rejects": {"short_of_negatives": 5, "duplicate_id_in_a_very_long_corpus_file_name": 1},
    }
    stages = [StageResult(name, Path("/x"), "f" * 64, reused=i % 2 == 0)
              for i, name in enumerate(["ingest", "embed_queries", "embed_corpus", "index", "bm25_index", "candidates",
                                        "rerank", "filter", "sample", "write"])]
    result = SimpleNamespace(stats=stats, stages=stages, out=Path("/very/long/output/path/" + "segment/" * 20 + "out"))
    console = Console(width=100, record=True, file=io.StringIO(), force_terminal=False)
    print_summary(result, console)
    lines = _lines_fit(console)
    assert any(line.strip() == "Candidates by decision" for line in lines), lines
