"""The training recipes (examples/train_bi_encoder.py, examples/train_reranker.py) run as scripts
on a hardneg output folder, as users run them, for a few steps on a Cranfield subset mined with
tiny models, and leave a trained model that loads and differs from the one they started from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import read_jsonl
from resilience import tiny_model
from test_miners import build_tiny_cross_encoder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mined(tmp_path_factory, small_beir):
    """The subset mined by the real pipeline with the tiny bi-encoder, in the three formats the
    recipes train on (one work dir: embedded once)."""
    import datasets

    import hardneg

    root = tmp_path_factory.mktemp("recipes")
    model = tiny_model(tmp_path_factory)
    outs = {}
    for fmt in ("n-tuple", "labeled-pair", "labeled-list"):
        outs[fmt] = root / fmt
        hardneg.mine(beir=small_beir, out=outs[fmt], work_dir=root / "work", model=str(model), runner="local",
                     positives="best", num_negatives=3, format=fmt, filters=[], range_min=0)
        # No false-negative filters: the tiny random model's cosines are all near-duplicates.
        assert len(datasets.load_from_disk(str(outs[fmt]))) >= 30
    texts = [d["text"] for d in read_jsonl(small_beir / "corpus.jsonl")]
    return {"outs": outs, "bi_encoder": model, "cross_encoder": build_tiny_cross_encoder(root / "tiny-ce", texts)}


def run_recipe(script: str, *args: str) -> str:
    """The script as `python examples/SCRIPT ARGS` runs it (as __main__, with its argv), in this
    process: the subprocess would only add half a minute of imports per run. Returns stdout."""
    import contextlib
    import io
    import runpy
    from unittest import mock

    stdout = io.StringIO()
    with mock.patch.object(sys, "argv", [script, *args]), contextlib.redirect_stdout(stdout):
        runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    return stdout.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mnrl", "cached-mnrl", "guided-mnrl"])
def test_bi_encoder_recipe_trains_on_n_tuple(mined, tmp_path, loss):
    from sentence_transformers import SentenceTransformer

    from hardneg.stages.models import weights_digest

    out = tmp_path / "model"
    stdout = run_recipe("train_bi_encoder.py", str(mined["outs"]["n-tuple"]), "--model", str(mined["bi_encoder"]),
                        "--loss", loss, "--max-steps", "3", "--batch-size", "8", "--mini-batch-size", "4",
                        "--learning-rate", "1e-3", "--output-dir", str(out))
    assert "trained 3 steps" in stdout and "train_loss=" in stdout
    before = weights_digest(SentenceTransformer(str(mined["bi_encoder"]), device="cpu"))
    assert weights_digest(SentenceTransformer(str(out), device="cpu")) != before


@pytest.mark.slow
@pytest.mark.parametrize("fmt,loss", [("labeled-pair", "BinaryCrossEntropyLoss"), ("labeled-list", "LambdaLoss")])
def test_reranker_recipe_trains_on_labeled_formats(mined, tmp_path, fmt, loss):
    from sentence_transformers.cross_encoder import CrossEncoder

    from hardneg.stages.models import weights_digest

    out = tmp_path / "reranker"
    stdout = run_recipe("train_reranker.py", str(mined["outs"][fmt]), "--model", str(mined["cross_encoder"]),
                        "--max-steps", "3", "--batch-size", "4", "--max-length", "128", "--learning-rate", "1e-3",
                        "--output-dir", str(out))
    assert "trained 3 steps" in stdout and f"({fmt}, {loss})" in stdout
    before = weights_digest(CrossEncoder(str(mined["cross_encoder"]), device="cpu"))
    trained = CrossEncoder(str(out), device="cpu")
    assert weights_digest(trained) != before
    assert len(trained.predict([("what is lift", "lift is a force")])) == 1


def test_recipes_refuse_the_wrong_format(mined, tmp_path):
    with pytest.raises(SystemExit, match="labeled-pair or labeled-list"):
        run_recipe("train_reranker.py", str(mined["outs"]["n-tuple"]), "--max-steps", "1", "--output-dir", str(tmp_path / "x"))
    with pytest.raises(SystemExit, match="n-tuple"):
        run_recipe("train_bi_encoder.py", str(mined["outs"]["labeled-list"]), "--max-steps", "1", "--output-dir", str(tmp_path / "y"))
