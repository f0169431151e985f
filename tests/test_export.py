"""`hardneg export`: hardneg output folders -> FlagEmbedding / Tevatron JSONL.

The datasets are made by hardneg's own writer (`stages.write.to_format` + `write_dataset`) from
mined rows built out of real Cranfield texts, and every export is read back the way the trainer
reads its training data: `datasets.load_dataset("json", data_files=...)`, then the fields it uses.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hardneg import schemas
from hardneg.pipeline.config import ConfigError
from hardneg.pipeline.outputs.export import content_id, export
from hardneg.stages.write import to_format, write_dataset

CRANFIELD = Path(__file__).parent.parent / "examples" / "cranfield"
K = 3  # negatives per pair


def _jsonl(path: Path) -> dict[str, dict]:
    with path.open(encoding="utf-8") as handle:
        return {row["_id"]: row for row in map(json.loads, handle)}


@pytest.fixture(scope="module")
def mined() -> pa.Table:
    """Mined rows (hardneg's MINED schema) for 6 Cranfield pairs: 5 queries, one of them with two
    judged positives (two pairs of one query, as `--positives all` makes); negatives are unjudged
    documents of the corpus, with made-up but distinct scores, ranks and sources."""
    corpus = _jsonl(CRANFIELD / "corpus.jsonl")
    queries = _jsonl(CRANFIELD / "queries.jsonl")
    relevant: dict[str, list[str]] = {}
    with (CRANFIELD / "qrels" / "test.tsv").open() as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            relevant.setdefault(row["query-id"], []).append(row["corpus-id"])
    doc_ids = sorted(corpus, key=int)
    rows = []
    for qi, query_id in enumerate(sorted(relevant, key=int)[:5]):
        positives = relevant[query_id][: 2 if qi == 0 else 1]
        for positive_id in positives:
            negative_ids = [d for d in doc_ids[qi * 10 + len(rows) * K:] if d not in relevant[query_id]][:K]
            order = len(rows)
            rows.append({
                "pair_order": order,
                "pair_id": f"{query_id}:{positive_id}",
                "query_id": query_id,
                "query": queries[query_id]["text"],
                "positive_id": positive_id,
                "positive": corpus[positive_id]["text"],
                "positive_score": 0.9 - 0.01 * order,
                "positive_ce_score": None,
                "negative_ids": negative_ids,
                "negatives": [corpus[d]["text"] for d in negative_ids],
                "negative_scores": [0.8 - 0.1 * i - 0.01 * order for i in range(K)],
                "negative_ranks": [i + 2 for i in range(K)],
                "negative_sources": [["dense"], ["dense", "bm25"], ["bm25"]],
                "negative_dense_scores": [0.8 - 0.1 * i - 0.01 * order for i in range(K)],
                "negative_dense_ranks": [i + 2 for i in range(K)],
                "negative_bm25_scores": [12.0 - i for i in range(K)],
                "negative_bm25_ranks": [i + 1 for i in range(K)],
                "negative_ce_scores": None,
                "negative_fused_ranks": [i + 1 for i in range(K)],
            })
    return pa.Table.from_pylist(rows, schema=schemas.MINED)


def _write(mined: pa.Table, folder: Path, fmt: str, metadata: bool, layout: str = "disk") -> Path:
    write_dataset(to_format(mined, fmt, K, metadata), folder, layout)
    return folder


def _trainer_load(path: Path, cache: Path) -> datasets.Dataset:
    """How FlagEmbedding and Tevatron load their JSON training files."""
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))


def _expected(mined: pa.Table) -> list[dict]:
    return mined.to_pylist()


FORMATS = ["n-tuple", "labeled-list", "triplet", "labeled-pair"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
def test_flagembedding_round_trip(mined, tmp_path, fmt, metadata):
    folder = _write(mined, tmp_path / "out", fmt, metadata)
    out_file = tmp_path / "fe" / "train.jsonl"
    assert export(folder, "flagembedding", out_file) == mined.num_rows

    train = _trainer_load(out_file, tmp_path / "cache")
    assert train.num_rows == mined.num_rows
    assert {"query", "pos", "neg", "prompt"} <= set(train.column_names)
    assert ("pos_scores" in train.column_names) == metadata
    assert ("neg_scores" in train.column_names) == metadata
    for got, want in zip(train, _expected(mined)):
        assert isinstance(got["query"], str) and got["query"] == want["query"]
        assert isinstance(got["pos"], list) and all(isinstance(t, str) for t in got["pos"])
        assert isinstance(got["neg"], list) and all(isinstance(t, str) for t in got["neg"])
        assert got["pos"] == [want["positive"]]
        assert got["neg"] == want["negatives"]
        assert got["prompt"] == ""
        if metadata:
            assert got["pos_scores"] == pytest.approx([want["positive_score"]], rel=1e-6)
            assert got["neg_scores"] == pytest.approx(want["negative_scores"], rel=1e-6)
            assert all(isinstance(s, float) and math.isfinite(s) for s in got["pos_scores"] + got["neg_scores"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
def test_tevatron_round_trip(mined, tmp_path, fmt, metadata):
    folder = _write(mined, tmp_path / "out", fmt, metadata)
    out_file = tmp_path / "tevatron.jsonl"
    assert export(folder, "tevatron", out_file) == mined.num_rows

    train = _trainer_load(out_file, tmp_path / "cache")
    assert train.num_rows == mined.num_rows
    assert set(train.column_names) == {"query_id", "query", "positive_passages", "negative_passages"}
    for got, want in zip(train, _expected(mined)):
        assert isinstance(got["query_id"], str) and isinstance(got["query"], str)
        assert got["query"] == want["query"]
        assert got["query_id"] == (want["query_id"] if metadata else content_id(want["query"]))
        for key in ("positive_passages", "negative_passages"):
            assert isinstance(got[key], list)
            for passage in got[key]:
                assert set(passage) == {"docid", "title", "text"}
                assert all(isinstance(v, str) for v in passage.values())
                assert passage["title"] == ""
        assert [p["text"] for p in got["positive_passages"]] == [want["positive"]]
        assert [p["text"] for p in got["negative_passages"]] == want["negatives"]
        if metadata:
            assert [p["docid"] for p in got["positive_passages"]] == [want["positive_id"]]
            assert [p["docid"] for p in got["negative_passages"]] == want["negative_ids"]
        else:
            assert [p["docid"] for p in got["negative_passages"]] == [content_id(t) for t in want["negatives"]]


def test_content_id_is_stable_sha1_16():
    text = "wing in a slipstream \u00e9"
    assert content_id(text) == hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    assert content_id(text) == content_id(str(text))


def test_hub_layout(mined, tmp_path):
    folder = _write(mined, tmp_path / "hub", "n-tuple", True, layout="hub")
    assert list((folder / "data").glob("*.parquet"))
    out_file = tmp_path / "fe.jsonl"
    assert export(folder, "flagembedding", out_file) == mined.num_rows
    lines = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [line["neg"] for line in lines] == mined.column("negatives").to_pylist()


def test_real_output_folder_with_rejects_and_manifest(mined, tmp_path):
    """A real output folder also holds rejects/, stats.json and hardneg.json beside the dataset."""
    folder = _write(mined, tmp_path / "out", "n-tuple", True)
    (folder / "rejects").mkdir()
    pq.write_table(schemas.REJECTS.empty_table(), folder / "rejects" / "rejects-00000.parquet")
    (folder / "stats.json").write_text("{}")
    (folder / "hardneg.json").write_text("{}")
    assert export(folder, "tevatron", tmp_path / "t.jsonl") == mined.num_rows


def test_pairs_without_negatives_are_skipped(mined, tmp_path):
    rows = mined.to_pylist()
    for key in ("negative_ids", "negatives", "negative_scores", "negative_ranks", "negative_sources",
                "negative_dense_scores", "negative_dense_ranks", "negative_bm25_scores", "negative_bm25_ranks",
                "negative_fused_ranks"):
        rows[0][key] = []
    table = pa.Table.from_pylist(rows, schema=schemas.MINED)
    folder = _write(table, tmp_path / "out", "labeled-list", True)
    out_file = tmp_path / "fe.jsonl"
    assert export(folder, "flagembedding", out_file) == mined.num_rows - 1
    assert all(json.loads(line)["neg"] for line in out_file.read_text().splitlines())


def test_unknown_target(mined, tmp_path):
    folder = _write(mined, tmp_path / "out", "n-tuple", True)
    with pytest.raises(ConfigError, match="unknown export target"):
        export(folder, "colbert", tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_not_a_hardneg_folder(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="not a hardneg output"):
        export(plain, "flagembedding", tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match="not a hardneg output"):
        export(tmp_path / "missing", "tevatron", tmp_path / "x.jsonl")
    # A datasets folder, but not one hardneg writes.
    other = tmp_path / "other"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(other))
    with pytest.raises(ConfigError, match="not a hardneg output"):
        export(other, "tevatron", tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_error_midway_keeps_previous_file(tmp_path):
    """Pairs without negatives cannot be exported; the failed export leaves the old file alone."""
    folder = tmp_path / "pairs"
    datasets.Dataset.from_dict({"query": ["q"], "positive": ["p"]}).save_to_disk(str(folder))
    out_file = tmp_path / "train.jsonl"
    out_file.write_text("previous\n")
    with pytest.raises(ConfigError, match="no negatives"):
        export(folder, "flagembedding", out_file)
    assert out_file.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "train.jsonl"]


def test_empty_output_exports_nothing(tmp_path):
    """No pair survived: the writer leaves an empty query/positive table; the export is empty."""
    folder = tmp_path / "empty"
    write_dataset(to_format(schemas.MINED.empty_table(), "labeled-list", K, True), folder, "disk")
    out_file = tmp_path / "fe.jsonl"
    assert export(folder, "flagembedding", out_file) == 0
    assert out_file.read_text() == ""


def test_export_onto_the_datasets_own_files_is_refused(mined, tmp_path):
    folder = _write(mined, tmp_path / "out", "n-tuple", True)
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for target in [next(folder.glob("*.arrow")), folder / "state.json", folder / "train.jsonl"]:
        with pytest.raises(ConfigError, match="inside the dataset"):
            export(folder, "flagembedding", target)
    assert {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert export(folder, "flagembedding", tmp_path / "train.jsonl") > 0
