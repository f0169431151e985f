"""Hybrid candidates (dense + BM25), cross-encoder rescoring, and provenance in the output."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from helpers import read_jsonl
from hardneg import MineConfig, run_mine

pytestmark = pytest.mark.slow


def build_tiny_cross_encoder(folder: Path, texts: list[str]) -> Path:
    """A 2-layer BERT cross-encoder with a small vocabulary, saved like any local model: no
    cross-encoder ships on PyPI, and this goes through exactly the loading path users use."""
    import re

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})[:2000]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz0123456789.,-()"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=1)
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory, small_beir) -> Path:
    texts = [d["text"] for d in read_jsonl(small_beir / "corpus.jsonl")]
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "tiny-ce", texts)


def test_tiny_cross_encoder_loads_through_the_user_path(tiny_cross_encoder):
    from hardneg.stages.rerank import RerankStage

    stage = RerankStage(model=str(tiny_cross_encoder), specs=[], corpus_dir=Path("."), max_length=64)
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(tiny_cross_encoder), max_length=64)
    scores = model.predict([("what is lift", "lift is a force"), ("what is lift", "drag")])
    assert len(scores) == 2
    assert stage.fingerprint_config()["content"]


def test_bm25_only_run_fills_bm25_provenance(small_beir, tmp_path):
    out = tmp_path / "a"
    run_mine(MineConfig(beir=small_beir, positives="best", miners=["bm25"], out=out, runner="local", num_negatives=3), progress=False)
    ds = datasets.load_from_disk(str(out))
    for row in ds:
        assert all(s == ["bm25"] for s in row["negative_sources"])
        assert all(r is not None for r in row["negative_bm25_ranks"])
        assert row["negative_bm25_ranks"] == sorted(row["negative_bm25_ranks"])
        assert all(s is not None for s in row["negative_dense_scores"])  # dense scores kept beside


def test_hybrid_with_cross_encoder_keeps_every_source(small_beir, tmp_path, tiny_cross_encoder):
    out = tmp_path / "b"
    config = MineConfig(beir=small_beir, positives="best", miners=["dense", "bm25"], cross_encoder=str(tiny_cross_encoder),
                        ce_max_length=128, out=out, runner="ray", workers=1, num_negatives=4, range_max=20)
    result = run_mine(config, progress=False)
    ds = datasets.load_from_disk(str(out))
    assert ds.num_rows == 30
    sources = set()
    for row in ds:
        assert all(score is not None for score in row["negative_ce_scores"])
        assert row["positive_ce_score"] is not None
        assert row["negative_fused_ranks"] == sorted(row["negative_fused_ranks"])
        for srcs, dense_rank, bm25_rank in zip(row["negative_sources"], row["negative_dense_ranks"], row["negative_bm25_ranks"]):
            assert ("dense" in srcs) == (dense_rank is not None)
            assert ("bm25" in srcs) == (bm25_rank is not None)
            sources.update(srcs)
    assert sources == {"dense", "bm25"}
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["scores_per_source"]) == {"dense", "bm25"}
    assert set(stats["decisions_per_source"]) == {"dense", "bm25"}
    assert "rerank" in result.computed


def test_cross_encoder_filters_read_its_scores(small_beir, tmp_path, tiny_cross_encoder):
    out = tmp_path / "c"
    config = MineConfig(beir=small_beir, positives="best", cross_encoder=str(tiny_cross_encoder), ce_max_length=128,
                        out=out, runner="local", num_negatives=2, range_max=10, score="cross_encoder", absolute_margin=0.0,
                        format="labeled-list")
    result = run_mine(config, progress=False)
    ds = datasets.load_from_disk(str(out))
    for row in ds:
        # every kept negative scores at most the positive under the cross-encoder
        assert all(s <= row["positive_ce_score"] + 1e-6 for s in row["negative_ce_scores"])
    assert result.stats["decisions"].get("absolute_margin", 0) > 0
