"""benchmarks/train_effect.py --quick: mines Cranfield's train half with hardneg, fine-tunes
all-MiniLM-L6-v2 a few steps per row and prints the table of nDCG@10 / R@100 with paired
bootstrap intervals (the figures themselves live in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT / "examples"))


def test_half_split_is_stable_and_balanced() -> None:
    import train_effect

    ids = [str(i) for i in range(1, 226)]
    halves = [train_effect.half_of(q) for q in ids]
    assert halves == [train_effect.half_of(q) for q in ids]
    assert 90 < sum(halves) < 135  # sha256 splits 225 ids roughly in two
    # Pinned values: the split (and every figure in RESULTS.md) must not move silently.
    assert [train_effect.half_of(q) for q in ("1", "2", "3", "4", "5", "6", "7", "8")] == [1, 1, 1, 0, 1, 1, 0, 0]


def test_validate_splits_each_train_half_and_never_scores_a_test_query(tmp_path: Path) -> None:
    import argparse

    import train_effect

    def folds(validate: bool):
        opts = argparse.Namespace(beir=ROOT / "examples" / "cranfield", work_dir=tmp_path, quick=False,
                                  max_seq_length=None, validate=validate)
        return train_effect.context(opts)["folds"]

    for (train, test), (fit, scored) in zip(folds(False), folds(True)):
        assert set(fit) | set(scored) == set(train) and not set(fit) & set(scored)
        assert not (set(fit) | set(scored)) & set(test)  # the fold's test half is left out
        assert min(len(fit), len(scored)) > len(train) / 4


def test_paired_bootstrap_interval_covers_a_known_shift() -> None:
    import train_effect

    a = {(0, 0, str(i)): [0.5 + 0.1, 0.0] for i in range(50)}
    b = {(0, 0, str(i)): [0.5 + (i % 5) * 0.01, 0.0] for i in range(50)}
    mean, lo, hi = train_effect.paired_ci(a, b, 0)
    assert math.isclose(mean, 0.1 - 0.02, abs_tol=1e-9)
    assert lo < mean < hi and lo > 0.05


def test_wise_ft_interpolation_is_the_weighted_mean_of_base_and_fine_tuned() -> None:
    import torch
    import train_effect

    base = {name: value.clone() for name, value in train_effect.base_model(32).state_dict().items()}
    for alpha in (0.0, 0.3):
        moved = train_effect.base_model(32)
        with torch.no_grad():
            for parameter in moved.parameters():
                parameter.add_(1.0)  # a "fine-tune" that moved every weight by exactly 1
        mixed = train_effect.interpolate_with_base(moved, alpha, 32).state_dict()
        name = next(n for n, v in base.items() if v.is_floating_point() and v.ndim == 2)
        assert torch.allclose(mixed[name], base[name] + alpha, atol=1e-5), (alpha, name)
    untouched = train_effect.base_model(32)
    assert train_effect.interpolate_with_base(untouched, 1.0, 32) is untouched  # alpha 1: the plain fine-tune


def test_in_batch_guide_never_masks_a_rows_own_mined_negative() -> None:
    """The gist_inbatch loss is GISTEmbedLoss's value when the guide masks no row's own negative,
    and keeps a mined negative that GISTEmbedLoss would mask (one the guide scores above the
    positive): only in-batch negatives are filtered by the guide."""
    import torch
    import train_effect
    from _recipe_losses import guided_in_batch_loss
    from sentence_transformers.sentence_transformer import losses

    model, guide = train_effect.base_model(32), train_effect.base_model(32)
    gist = losses.GISTEmbedLoss(model, guide, temperature=0.05)
    inbatch = guided_in_batch_loss(model, guide, temperature=0.05)

    def value(loss, queries, positives, negatives):
        encode = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers 6 renamed tokenize
        features = [encode(texts) for texts in (queries, positives, negatives)]
        with torch.no_grad():
            return float(loss(features, None))

    queries = ["supersonic flow over a wedge", "heat transfer in a boundary layer"]
    positives = ["oblique shock waves on wedges at supersonic speed", "boundary layer heat transfer rates"]
    unrelated = ["the price of grain in medieval markets", "a recipe for lemon cake"]
    assert value(inbatch, queries, positives, unrelated) == pytest.approx(value(gist, queries, positives, unrelated), rel=1e-6)
    # Each row's mined negative is its own query text: the guide scores it above the positive.
    echoes = list(queries)
    kept, masked = value(inbatch, queries, positives, echoes), value(gist, queries, positives, echoes)
    assert kept > masked + 0.5  # the own negative scored far above the positive now counts


@pytest.mark.slow
def test_quick_prints_finite_table_with_expected_rows(warm_work_dir: Path, tmp_path: Path) -> None:
    summary_file = tmp_path / "summary.json"
    work = tmp_path / "train"  # the script's hardneg work dir is WORK/hn-work: the warm Cranfield one
    work.mkdir()
    warm_work_dir.rename(work / "hn-work")
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_effect.py", "--beir", "examples/cranfield", "--quick",
         "--work-dir", str(work), "--json", str(summary_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("base", "oracle (all judged masked)", "hardneg defaults"):
        line = next((ln for ln in out.splitlines() if ln.startswith(row + " ")), None)
        assert line is not None, out
        numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)]
        assert numbers and all(math.isfinite(x) for x in numbers), line
    summary = json.loads(summary_file.read_text())
    for name, row in summary["rows"].items():
        assert 0 < row["ndcg@10"] <= 1 and 0 < row["recall@100"] <= 1, name
    assert summary["rows"]["oracle (all judged masked)"]["fn_rate"] == 0.0  # every judged document masked
    assert summary["rows"]["hardneg defaults"]["vs_base"]["ndcg@10"] is not None
