"""Each stage in-process on tiny inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hardneg import schemas
from helpers import write_beir
from hardneg.pipeline.config import MineConfig
from hardneg.stages.ingest import IngestStage, content_id
from hardneg.stages.io import read_table


def ingest(tmp_path: Path, **keys) -> tuple[Path, dict]:
    out = tmp_path / "ingest"
    out.mkdir()
    info = IngestStage(MineConfig(out=tmp_path / "o", **keys)).run({}, out)
    return out, info


def tiny_beir(folder: Path) -> Path:
    corpus = [{"_id": str(i), "title": f"t{i}", "text": f"document number {i}"} for i in range(1, 8)]
    queries = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}]
    qrels = [("q1", "5", 2), ("q1", "3", 2), ("q1", "4", 1), ("q2", "7", 1), ("q2", "6", 0)]
    return write_beir(folder, corpus, queries, qrels)


def test_beir_best_positive_ties_to_lowest_id_and_masks_the_others(tmp_path):
    out, info = ingest(tmp_path, beir=tiny_beir(tmp_path / "b"), positives="best")
    queries = {r["query_id"]: r for r in read_table(out / "queries").to_pylist()}
    assert queries["q1"]["positive_ids"] == ["3"]            # grade 2 tie between 5 and 3 -> lowest id
    assert queries["q1"]["mask_ids"] == ["3", "4", "5"]      # the other judged positives stay masked
    assert queries["q2"]["positive_ids"] == ["7"]             # grade 0 is not a positive
    assert info["pairs"] == 2


def test_hide_extra_positives_leaves_them_in_the_pool(tmp_path):
    out, _ = ingest(tmp_path, beir=tiny_beir(tmp_path / "b"), positives="best", hide_extra_positives=True)
    queries = {r["query_id"]: r for r in read_table(out / "queries").to_pylist()}
    assert queries["q1"]["mask_ids"] == ["3"]


def test_positives_all_makes_one_pair_per_judged_document(tmp_path):
    out, info = ingest(tmp_path, beir=tiny_beir(tmp_path / "b"))
    pairs = read_table(out / "pairs").to_pylist()
    assert [(p["query_id"], p["positive_id"]) for p in pairs] == [("q1", "5"), ("q1", "3"), ("q1", "4"), ("q2", "7")]
    corpus = read_table(out / "corpus").to_pylist()
    assert corpus[0] == {"doc_id": "1", "text": "t1 document number 1"}


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets"])
def test_pair_files_hash_ids_and_mask_all_positives_of_a_query(tmp_path, kind):
    rows = [{"anchor": "what is lift", "positive": "lift is a force"},
            {"anchor": "what is lift", "positive": "wings make lift"},
            {"anchor": "what is drag", "positive": "drag resists motion"}]
    path = tmp_path / "pairs"
    if kind == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    out, info = ingest(tmp_path, pairs=path)
    queries = read_table(out / "queries").to_pylist()
    assert [q["query_id"] for q in queries] == [content_id("what is lift"), content_id("what is drag")]
    assert sorted(queries[0]["mask_ids"]) == sorted([content_id("lift is a force"), content_id("wings make lift")])
    assert read_table(out / "corpus").num_rows == 3
    assert info["pairs"] == 3


def test_pair_file_with_corpus_maps_identical_text_to_the_corpus_id(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"q": "what is lift", "p": "lift is a force"}) + "\n")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "text": "lift is a force"}) + "\n" + json.dumps({"_id": "d2", "text": "other"}) + "\n")
    out, _ = ingest(tmp_path, pairs=pairs, corpus=corpus)
    assert read_table(out / "pairs").column("positive_id").to_pylist() == ["d1"]
    assert read_table(out / "corpus").num_rows == 2


def test_pair_file_bad_rows_are_rejected_as_pairs(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"q": "a", "p": "b"}\n{"q": \n{"q": "", "p": "x"}\n{"q": 3, "p": "x"}\n\xff\xfe\n')
    out, info = ingest(tmp_path, pairs=pairs)
    rejects = read_table(out / "rejects").to_pylist()
    assert sorted(r["reason"] for r in rejects) == ["empty_text", "invalid_json", "invalid_utf8", "wrong_type"]
    assert all(r["pair"] for r in rejects)
    assert info["pairs"] == 1


def _batch_check(stage, texts):
    stage.ensure_setup()
    together = stage.encode(texts)
    alone = np.vstack([stage.encode([t]) for t in texts])
    shuffled = stage.encode(texts[::-1])[::-1]
    return together, alone, shuffled


BATCH_TEXTS = ["a short text", "a much longer text about the lift of a wing in a slipstream " * 5, "drag", "another one"]


def test_embedding_does_not_depend_on_the_batch(tmp_path):
    from hardneg.stages.embed import EmbedStage

    stage = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", micro_batch_size=2, threads=1)
    together, alone, shuffled = _batch_check(stage, BATCH_TEXTS)
    # The same input block gives the same vectors in any order (what runners rely on: they all
    # cut the input into the same blocks). torch's fp32 CPU kernels may round a row differently
    # with the number of rows beside it (seen on AVX512 CPUs), so alone is only close there.
    assert np.array_equal(together, shuffled)
    assert np.allclose(together, alone, atol=1e-6)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    st = stage._encoder.model.encode(BATCH_TEXTS, normalize_embeddings=True)
    assert (together * st).sum(axis=1).min() > 0.9999


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_engine_matches_torch_and_ignores_the_batch(tmp_path, monkeypatch, precision):
    from hardneg.stages import embed
    from hardneg.stages.embed import EmbedStage
    from hardneg.stages.models import cpu_supports_bf16

    if precision == "bf16" and not cpu_supports_bf16():
        pytest.skip("bf16 is emulated on this CPU")
    monkeypatch.setenv("HARDNEG_CACHE", str(tmp_path / "cache"))
    stage = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", micro_batch_size=2,
                       threads=1, precision=precision, backend="openvino")
    together, alone, shuffled = _batch_check(stage, BATCH_TEXTS)
    # OpenVINO's kernels give a row the same bits whatever rows share its forward pass.
    assert np.array_equal(together, alone) and np.array_equal(together, shuffled)
    reference = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", precision="fp32")
    reference.ensure_setup()
    assert (together * reference.encode(BATCH_TEXTS)).sum(axis=1).min() > 0.9999
    # Converted once, then read from the cache: a second worker does not trace the model again.
    cached = list((tmp_path / "cache" / "openvino").glob("*/model.xml"))
    assert len(cached) == 1
    assert stage.fingerprint_config()["backend"] == "openvino" and "backend" not in reference.fingerprint_config()
    before = cached[0].stat().st_mtime_ns
    embed._MODELS.clear()  # as in a fresh worker process
    again = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", micro_batch_size=2,
                       threads=1, precision=precision, backend="openvino")
    again.ensure_setup()
    assert cached[0].stat().st_mtime_ns == before
    assert np.array_equal(again.encode(BATCH_TEXTS), together)


def test_openvino_embeds_without_torch_once_converted(tmp_path, monkeypatch):
    """A converted model embeds in a fresh process with openvino, tokenizers and numpy alone
    (importing torch and sentence-transformers costs more than embedding a small corpus), and
    gives the vectors the converting process gave."""
    import subprocess
    import sys

    from hardneg.stages import embed
    from hardneg.stages.embed import EmbedStage

    monkeypatch.setenv("HARDNEG_CACHE", str(tmp_path / "cache"))
    embed._MODELS.clear()
    stage = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", threads=1, precision="fp32", backend="openvino")
    stage.ensure_setup()
    here = stage.encode(BATCH_TEXTS)
    embed._MODELS.clear()
    script = ("import json, sys; from hardneg.stages.embed import EmbedStage; "
              "s = EmbedStage(model='all-MiniLM-L6-v2', id_column='id', text_column='text', threads=1, precision='fp32', backend='openvino'); "
              f"s.ensure_setup(); v = s.encode({BATCH_TEXTS!r}); "
              "print(json.dumps({'heavy': sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules), 'v': v.tolist()}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["heavy"] == []
    assert np.array_equal(np.asarray(there["v"], dtype=np.float32), here)


@pytest.mark.parametrize("mode, standalone", [("cls", True), ("max", True), ("lasttoken", False)])
def test_openvino_pools_as_the_model_does(tmp_path, monkeypatch, mode, standalone):
    """Pooling modes the engine computes in numpy match the model's own Pooling module; any other
    keeps the model's modules (in torch) after the OpenVINO transformer. Either way the vectors
    are torch's."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    from hardneg.stages import embed
    from hardneg.stages.embed import EmbedStage
    from hardneg.stages.models import resolve_model

    monkeypatch.setenv("HARDNEG_CACHE", str(tmp_path / "cache"))
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    model[1] = Pooling(model.get_embedding_dimension(), pooling_mode=mode)
    model.save(str(tmp_path / "model"))
    embed._MODELS.clear()
    ours = EmbedStage(model=str(tmp_path / "model"), id_column="id", text_column="text", threads=1, precision="fp32", backend="openvino")
    ours.ensure_setup()
    meta = json.loads(next((tmp_path / "cache" / "openvino").glob("*/meta.json")).read_text())
    assert meta["pooling"] == mode and meta["standalone"] is standalone
    reference = model.encode(BATCH_TEXTS, normalize_embeddings=True)
    assert (ours.encode(BATCH_TEXTS) * reference).sum(axis=1).min() > 0.9999
    embed._MODELS.clear()


def mined_rows() -> pa.Table:
    rows = []
    for i, count in enumerate([3, 2]):
        rows.append({
            "pair_order": i, "pair_id": f"q{i}:p{i}", "query_id": f"q{i}", "query": f"query {i}",
            "positive_id": f"p{i}", "positive": f"positive {i}", "positive_score": 0.9, "positive_ce_score": None,
            "negative_ids": [f"n{i}{j}" for j in range(count)], "negatives": [f"negative {i}{j}" for j in range(count)],
            "negative_scores": [0.5] * count, "negative_ranks": list(range(1, count + 1)), "negative_sources": [["dense"]] * count,
            "negative_dense_scores": [0.5] * count, "negative_dense_ranks": list(range(1, count + 1)),
            "negative_bm25_scores": None, "negative_bm25_ranks": None, "negative_ce_scores": None,
            "negative_fused_ranks": list(range(1, count + 1)),
        })
    return pa.Table.from_pylist(rows, schema=schemas.MINED)


@pytest.mark.parametrize("fmt, rows, columns", [
    ("n-tuple", 2, ["query", "positive", "negative_1", "negative_2"]),
    ("triplet", 4, ["query", "positive", "negative"]),
    ("labeled-pair", 7, ["query", "passage", "label"]),
    ("labeled-list", 2, ["query", "passages", "labels"]),
])
def test_output_formats(fmt, rows, columns):
    from hardneg.stages.write import to_format

    mined = mined_rows()
    if fmt in ("n-tuple", "triplet"):
        # the writer rejects pairs short of K before formatting
        mined = pa.Table.from_pylist([r for r in mined.to_pylist() if len(r["negative_ids"]) >= 2], schema=schemas.MINED)
    table = to_format(mined, fmt, 2, metadata=True)
    assert table.num_rows == rows
    assert table.column_names[: len(columns)] == columns
    if fmt == "labeled-list":
        assert table.column("labels").to_pylist() == [[1, 0, 0, 0], [1, 0, 0]]
    if fmt == "labeled-pair":
        assert table.column("label").to_pylist() == [1, 0, 0, 0, 1, 0, 0]
    plain = to_format(mined, fmt, 2, metadata=False)
    assert plain.column_names == columns


@pytest.mark.gpu
def test_cuda_embedding_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    from hardneg.stages.embed import EmbedStage

    texts = ["lift of a wing", "boundary layer transition at hypersonic speeds"]
    cpu = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text")
    gpu = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", device="cuda", precision="fp16")
    cpu.ensure_setup()
    gpu.ensure_setup()
    assert (cpu.encode(texts) * gpu.encode(texts)).sum(axis=1).min() > 0.999


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:
            current = fields[5] if len(fields) > 5 else None
        elif fields and fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


@pytest.mark.parametrize("gather", ["mapped", "pread", "auto", "numpy"])
def test_vector_file_reads_rows_without_keeping_the_file_resident(tmp_path, monkeypatch, gather):
    from hardneg.stages import io
    from hardneg.stages.io import VectorFile

    if gather == "numpy":  # the fallback without numba
        monkeypatch.setattr(io, "_compiled_gathers", lambda: None)
    else:
        assert io._compiled_gathers() is not None  # numba is a dependency: the compiled gathers run
    path = tmp_path / "vectors.npy"
    matrix = np.random.default_rng(0).standard_normal((100_000, 96)).astype(np.float32)  # 37 MiB
    np.save(path, matrix)
    vectors = VectorFile(path, gather="auto" if gather == "numpy" else gather)
    rows = np.random.default_rng(1).integers(0, len(matrix), 20_000)  # scattered, with repeats
    assert np.array_equal(vectors.take(rows), matrix[rows])
    assert np.array_equal(vectors.take(rows[::-1]), matrix[rows[::-1]])
    # Into a buffer the caller reuses: sorted distinct rows are gathered in place, others too.
    buffer = np.full((30_000, 96), np.nan, dtype=np.float32)
    for wanted in (np.unique(rows), rows):
        assert vectors.take(wanted, out=buffer[:len(wanted)]) is not None
        assert np.array_equal(buffer[:len(wanted)], matrix[wanted])
    with pytest.raises(ValueError, match="out"):
        vectors.take(rows, out=buffer)
    assert np.array_equal(vectors.rows(99_990, 100_000), matrix[99_990:])
    assert vectors.take(np.array([], dtype=np.int64)).shape == (0, 96)
    with pytest.raises(IndexError):
        vectors.take(np.array([100_000]))
    # The rows read are released: the file's pages do not stay in this process's memory.
    assert _mapped_kib(path.resolve()) < 1024
    # A plain memory map keeps what scattered reads touched, and the pages around them.
    plain = np.load(path, mmap_mode="r")
    _ = np.asarray(plain[np.sort(rows)])
    assert _mapped_kib(path.resolve()) > 16_384


def test_vector_file_gathers_the_way_that_has_cost_less_per_row():
    from hardneg.stages.io import Gather

    gather = Gather()
    first = [gather.next() for _ in range(6)]
    assert sorted(first) == ["mapped"] * 3 + ["pread"] * 3  # each way tried three times
    for i, way in enumerate(first):  # the first call of each, which compiles it, does not count
        gather.record(way, {"mapped": 0.01, "pread": 0.04}[way] * (1 if way in first[:i] else 100), 50_000)
    chosen = [gather.next() for _ in range(2 * Gather.RETRY)]
    assert chosen.count("pread") == 2 and chosen.count("mapped") == 2 * Gather.RETRY - 2  # retried now and then
    for _ in range(6):  # the page cache changed: mapped reads now cost more
        gather.record("mapped", 0.09, 50_000)
    assert gather.next() == "pread"
    assert Gather("mapped").next() == "mapped"
    with pytest.raises(ValueError, match="gather"):
        Gather("mmap")


def test_embed_backend_is_checked_at_config_time(monkeypatch):
    from hardneg.pipeline.errors import ConfigError
    from hardneg.stages.engines import openvino as openvino_engine
    from hardneg.stages.models import pick_backend

    assert pick_backend("torch", "cuda", "fp16") == "torch"
    assert pick_backend("auto", "cuda", "fp16") == "torch"
    assert pick_backend("auto", "cpu", "fp32") == "torch"  # torch fp32 is the reference
    assert pick_backend("auto", "cpu", "bf16") == ("openvino" if openvino_engine.available() else "torch")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        pick_backend("openvino", "cuda", "fp16")
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        pick_backend("openvino", "cpu", "fp16")
    monkeypatch.setattr(openvino_engine, "available", lambda: False)
    assert pick_backend("auto", "cpu", "bf16") == "torch"
    with pytest.raises(ConfigError, match="not installed"):
        pick_backend("openvino", "cpu", "bf16")


def test_a_model_openvino_cannot_run_fails_in_one_line_naming_the_way_out(tmp_path, monkeypatch):
    from hardneg.pipeline.errors import ModelLoadError
    from hardneg.stages import embed
    from hardneg.stages.embed import EmbedStage

    monkeypatch.setenv("HARDNEG_CACHE", str(tmp_path / "cache"))
    stage = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", backend="openvino")

    def untraceable(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::custom_op\nmore detail")

    monkeypatch.setattr("hardneg.stages.engines.openvino._convert", untraceable)
    with pytest.raises(ModelLoadError, match=r"OpenVINO cannot convert it \(RuntimeError: unsupported operation aten::custom_op\); set embed_backend: torch$"):
        stage._open_openvino()
    embed._MODELS.clear()


def test_doc_ids_find_rows_by_id_and_none_in_an_empty_corpus():
    """id -> row by binary search: ids outside the corpus (and every id, when the corpus is empty,
    as for a run whose positives have no text) are -1."""
    import pyarrow as pa

    from hardneg.stages.io import DocIds

    ids = DocIds(pa.array(["d10", "d2", "a-long-document-id", "d1"]))
    assert ids.rows(pa.array(["d1", "x", "d10", "a-long-document-id", "d2"])).tolist() == [3, -1, 0, 2, 1]
    assert DocIds(pa.array([], pa.string())).rows(pa.array(["d1", "d2"])).tolist() == [-1, -1]
    assert ids.rows(pa.array([], pa.string())).tolist() == []


def test_doc_ids_hash_lookups_equal_the_binary_search(monkeypatch):
    """Large lookups of ids of at most 8 bytes go through a hash table: the same rows as the
    binary search for ids in the corpus, missing, longer than any corpus id, empty, and for
    sliced and chunked arrays."""
    import pyarrow as pa

    from hardneg.stages import io

    rng = np.random.default_rng(2)
    corpus = [f"d{i}" for i in rng.permutation(20_000)] + ["abcdefgh", "x", "é1"]
    ids = io.DocIds(pa.array(corpus))
    needles = pa.array([f"d{i}" for i in rng.integers(0, 25_000, 9_000)] + ["abcdefgh", "abcdefg", "x", "", "é1",
                                                                            "abcdefghi", "a-much-longer-id"])
    cases = [needles, needles.slice(17, 6_000), pa.chunked_array([needles.slice(0, 5_000), needles.slice(5_000)])]
    monkeypatch.setattr(io, "HASH_LOOKUPS", 1)
    hashed = [ids.rows(c) for c in cases]
    assert getattr(ids, "_slots", None) is not None or io._compiled_hash() is None
    monkeypatch.setattr(io, "HASH_LOOKUPS", 10**12)
    searched = [ids.rows(c) for c in cases]
    for a, b in zip(hashed, searched):
        assert np.array_equal(a, b)
    assert (hashed[0] >= 0).sum() > 7_000 and (hashed[0] == -1).sum() > 1_000
    assert hashed[0][-7:].tolist() == [20_000, -1, 20_001, -1, 20_002, -1, -1]


def test_the_pipeline_allocator_is_set_only_while_the_pipeline_runs():
    """`import hardneg` leaves pyarrow's memory pool alone; a run swaps in the C library's
    allocator and gives the caller's pool back after."""
    import os
    import subprocess
    import sys

    code = ("import os, pyarrow as pa; os.environ.pop('ARROW_DEFAULT_MEMORY_POOL', None)\n"
            "before = pa.default_memory_pool().backend_name\n"
            "import hardneg, hardneg.stages.io as io\n"
            "assert pa.default_memory_pool().backend_name == before, 'import changed the pool'\n"
            "with io.arrow_allocator():\n"
            "    assert pa.default_memory_pool().backend_name == 'system'\n"
            "assert pa.default_memory_pool().backend_name == before\n")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
