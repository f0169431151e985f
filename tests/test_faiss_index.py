"""Tests for stages.engines.faiss_index: exactness, recall of the auto approximate index, sharding,
storage / factory variants, memmap input, determinism and the GPU switches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from hardneg.stages.engines import faiss_index
from hardneg.stages.engines.faiss_index import AnnIndex, IndexConfig, build_index, gpu_available, gpu_status, run_in_child


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    return normalised(np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32))


def gaussian_mixture(n: int, d: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """Normalised points around random unit centres; spread*sqrt(d) ~ noise norm vs 1."""
    rng = np.random.default_rng(seed)
    centres = normalised(rng.standard_normal((n_clusters, d), dtype=np.float32))
    labels = rng.integers(0, n_clusters, n)
    return normalised(centres[labels] + spread * rng.standard_normal((n, d), dtype=np.float32))


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, axis=1), rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f, t).size / len(t) for f, t in zip(found, truth)]))


def build_and_load(x: np.ndarray, cfg: IndexConfig, out: Path) -> AnnIndex:
    build_index(x, cfg, out)
    return AnnIndex.load(out, cfg)


# ---------------------------------------------------------------------------- (1) exact


def test_flat_matches_numpy_brute_force(tmp_path: Path) -> None:
    x = random_unit(3000, 32, seed=1)
    q = random_unit(50, 32, seed=2)
    idx = build_and_load(x, IndexConfig(), tmp_path)
    assert idx.description == "Flat (exact, 1 shard, cpu)"
    scores, rows = idx.search(q, 10)
    want_scores, want_rows = brute_force(x, q, 10)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert np.array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["factory"] == "Flat" and meta["metric"] == "inner_product"
    assert meta["shards"] == [{"file": "shard_00000.faiss", "offset": 0, "count": 3000}]


def test_padding_when_fewer_than_k(tmp_path: Path) -> None:
    x = random_unit(20, 16, seed=3)
    idx = build_and_load(x, IndexConfig(shard_size=7), tmp_path)  # 3 shards of <= 7
    scores, rows = idx.search(x[:4], 30)
    assert (rows[:, :20] >= 0).all() and (rows[:, 20:] == -1).all()
    assert np.isneginf(scores[:, 20:]).all() and np.isfinite(scores[:, :20]).all()
    assert np.array_equal(np.sort(rows[:, :20], axis=1), np.tile(np.arange(20), (4, 1)))
    assert np.array_equal(rows[:, 0], np.arange(4))  # each vector is its own best match


# ------------------------------------------------------------------ (2) THE recall test


def test_auto_approximate_recall_at_100(tmp_path: Path) -> None:
    n, d, k = 100_000, 64, 100
    data = gaussian_mixture(n + 300, d, n_clusters=1000, spread=0.125, seed=7)
    x, q = data[:n], data[n:]  # held-out queries from the same distribution
    cfg = IndexConfig(exact_threshold=50_000)  # n > threshold: auto goes approximate

    t0 = time.perf_counter()
    build_index(x, cfg, tmp_path)
    t_build = time.perf_counter() - t0
    idx = AnnIndex.load(tmp_path, cfg)
    t1 = time.perf_counter()
    _, rows = idx.search(q, k)
    t_search = time.perf_counter() - t1

    _, truth = brute_force(x, q, k)
    r = recall(rows, truth)
    meta = json.loads((tmp_path / "index.json").read_text())
    print(
        f"\n[recall] {idx.description}: recall@{k} = {r:.4f} over {len(q)} queries; "
        f"build {t_build:.1f}s, search {t_search:.2f}s; "
        f"calibration {meta['calibration']['shards'][0]['recall']}"
    )
    assert meta["factory"].startswith("IVF") and meta["nprobe"] == idx.nprobe
    assert cfg.nprobe is None  # default nprobe, chosen by the build
    assert r >= 0.95


# ----------------------------------------------------------------------- (3) sharding


def test_sharded_flat_equals_unsharded(tmp_path: Path) -> None:
    x = random_unit(10_000, 32, seed=4)
    q = random_unit(100, 32, seed=5)
    one = build_and_load(x, IndexConfig(), tmp_path / "one")
    three = build_and_load(x, IndexConfig(shard_size=3500), tmp_path / "three")
    assert three.description == "Flat (exact, 3 shards, cpu)"
    meta = json.loads((tmp_path / "three" / "index.json").read_text())
    assert [(s["offset"], s["count"]) for s in meta["shards"]] == [(0, 3500), (3500, 3500), (7000, 3000)]
    s1, r1 = one.search(q, 50)
    s3, r3 = three.search(q, 50)
    assert np.array_equal(r1, r3)
    np.testing.assert_allclose(s1, s3, rtol=0, atol=1e-6)


def test_sharded_ivf_trains_once_and_merges(tmp_path: Path) -> None:
    x = gaussian_mixture(12_000, 32, n_clusters=100, spread=0.1, seed=6)
    q = x[:100]
    cfg = IndexConfig(exact_threshold=1000, shard_size=5000)
    idx = build_and_load(x, cfg, tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert len(meta["shards"]) == 3 and meta["factory"].startswith("IVF")
    _, rows = idx.search(q, 20)
    assert np.array_equal(rows[:, 0], np.arange(100))  # self match, global row numbers
    assert recall(rows, brute_force(x, q, 20)[1]) >= 0.95


# ------------------------------------------------------------ (4) storage / factories


@pytest.mark.parametrize(
    "cfg, factory_prefix",
    [
        (IndexConfig(exact_threshold=1000, storage="fp16"), "IVF"),
        (IndexConfig(exact_threshold=1000), "IVF"),  # storage auto: fp16 codes
        (IndexConfig(index="IVF64,Flat"), "IVF64,Flat"),
        (IndexConfig(index="HNSW32"), "HNSW32"),
        (IndexConfig(index="IVF64,SQfp16", nprobe=8), "IVF64,SQfp16"),
    ],
    ids=["auto-fp16", "auto-default", "IVF64,Flat", "HNSW32", "IVF64,SQfp16-nprobe8"],
)
def test_storage_and_factory_strings(tmp_path: Path, cfg: IndexConfig, factory_prefix: str) -> None:
    x = gaussian_mixture(8000, 32, n_clusters=50, spread=0.1, seed=8)
    q = gaussian_mixture(100, 32, n_clusters=50, spread=0.1, seed=8)  # same centres
    idx = build_and_load(x, cfg, tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["factory"].startswith(factory_prefix)
    if cfg.storage in ("fp16", "auto") and cfg.index == "auto":
        assert meta["factory"].endswith(",SQfp16") and meta["storage"] == "fp16"
    if cfg.nprobe is not None:
        assert meta["nprobe"] == cfg.nprobe and meta["calibration"] is None
    scores, rows = idx.search(q, 10)
    assert scores.shape == rows.shape == (100, 10)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # sorted by score, descending
    assert recall(rows, brute_force(x, q, 10)[1]) >= 0.9


def test_pq_storage_builds_and_searches(tmp_path: Path) -> None:
    x = gaussian_mixture(3000, 16, n_clusters=20, spread=0.1, seed=9)
    idx = build_and_load(x, IndexConfig(exact_threshold=100, storage="pq"), tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["factory"].endswith(",PQ4")  # m = 16/4
    _, rows = idx.search(x[:50], 10)
    assert (rows >= 0).all() and recall(rows, brute_force(x, x[:50], 10)[1]) >= 0.3  # lossy


def test_auto_factory_rule() -> None:
    assert faiss_index.auto_factory(100_000, 384, 100_000, "fp32") == "IVF1024,Flat"
    # 4*sqrt(1M) = 4000 -> 4096, capped at 100k/39 -> 2048 by the training sample
    assert faiss_index.auto_factory(1_000_000, 384, 100_000, "fp16") == "IVF2048,SQfp16"
    assert faiss_index.auto_factory(1_000_000, 384, 200_000, "pq") == "IVF4096,PQ96"


def test_bad_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        IndexConfig(nlist=5)  # extra="forbid"
    with pytest.raises(ValueError):
        build_index(random_unit(10, 8, 0), IndexConfig(index="NotAnIndex"), tmp_path)


# ---------------------------------------------------------------------------- (5/6) GPU


@pytest.mark.skipif(gpu_available(), reason="a GPU is available here")
def test_gpu_on_without_gpu_raises(tmp_path: Path) -> None:
    x = random_unit(100, 8, seed=0)
    with pytest.raises(ValueError, match="gpu='on'"):
        build_index(x, IndexConfig(gpu="on"), tmp_path)
    build_index(x, IndexConfig(), tmp_path)
    with pytest.raises(ValueError, match="gpu='on'"):
        AnnIndex.load(tmp_path, IndexConfig(gpu="on"))


def test_gpu_status_says_in_one_line_why_no_gpu_is_used() -> None:
    usable, why = gpu_status()
    if usable:
        pytest.skip("faiss can use a GPU here")
    assert why and "\n" not in why


def test_a_gpu_check_whose_process_aborts_is_reported_not_fatal() -> None:
    # What faiss does on a GPU it has no kernels for (PyPI's faiss-gpu-cu12 on an H200, seen on
    # the device): FAISS_ASSERT prints the CUDA error and aborts the process.
    aborts = ("import os, sys\nsys.stderr.write(\"Faiss assertion 'err__ == cudaSuccess' failed in runL2Norm; "
              "details: CUDA error 209 no kernel image is available for execution on the device\\n\")\nos.abort()")
    assert run_in_child(aborts) == (False, "CUDA error 209 no kernel image is available for execution on the device")
    assert run_in_child("pass") == (True, "")
    usable, why = run_in_child("import time\ntime.sleep(30)", timeout=0.5)
    assert not usable and "did not finish" in why


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss GPU support and a visible GPU")
def test_gpu_search_equals_cpu_exact(tmp_path: Path) -> None:
    x = random_unit(5000, 32, seed=10)
    q = random_unit(64, 32, seed=11)
    gpu = build_and_load(x, IndexConfig(gpu="on"), tmp_path / "flat")
    assert "gpu" in gpu.description
    scores, rows = gpu.search(q, 20)
    want_scores, want_rows = brute_force(x, q, 20)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-4)
    assert recall(rows, want_rows) >= 0.999  # float-rounding ties may swap a row
    # k above the GPU selection limit falls back to CPU and still returns k results
    scores, rows = gpu.search(q[:4], 3000)
    assert (rows >= 0).all() and np.array_equal(rows[:, :20], brute_force(x, q[:4], 20)[1])
    # an IVF built and searched on GPU
    ivf = build_and_load(x, IndexConfig(index="IVF64,Flat", gpu="on"), tmp_path / "ivf")
    _, rows = ivf.search(q, 20)
    assert recall(rows, want_rows) >= 0.95


# ------------------------------------------------------------------------- (7) memmap


def test_build_from_memmap_npy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faiss_index, "ADD_CHUNK", 1000)  # many chunks, as with a large corpus
    x = gaussian_mixture(6000, 32, n_clusters=40, spread=0.1, seed=12)
    np.save(tmp_path / "emb.npy", x)
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    # The IVF training sample is read from the file by pread only when the memmap is the whole
    # file: a slice of it (other rows, same file) or an array in memory is indexed as given.
    from hardneg.stages.io import VectorFile

    assert VectorFile.behind(mm) is not None
    assert VectorFile.behind(mm[1000:]) is None and VectorFile.behind(mm[:, :16]) is None and VectorFile.behind(x) is None
    for cfg, name in [(IndexConfig(shard_size=2500), "flat"), (IndexConfig(index="IVF32,Flat"), "ivf")]:
        a = build_and_load(mm, cfg, tmp_path / f"{name}-mm")
        b = build_and_load(x, cfg, tmp_path / f"{name}-ram")
        sa, ra = a.search(x[:30], 10)
        sb, rb = b.search(x[:30], 10)
        assert np.array_equal(ra, rb) and np.array_equal(sa, sb)
        assert np.array_equal(ra[:, 0], np.arange(30))


# ------------------------------------------------------------------------ determinism


def test_same_inputs_give_same_index_and_results(tmp_path: Path) -> None:
    x = gaussian_mixture(10_000, 32, n_clusters=60, spread=0.12, seed=13)
    cfg = IndexConfig(exact_threshold=1000, shard_size=6000, train_sample=5000, seed=3)
    a = build_and_load(x, cfg, tmp_path / "a")
    b = build_and_load(x, cfg, tmp_path / "b")
    for name in ["shard_00000.faiss", "shard_00001.faiss"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "index.json").read_text() == (tmp_path / "b" / "index.json").read_text()
    sa, ra = a.search(x[:200], 25)
    sb, rb = b.search(x[:200], 25)
    assert np.array_equal(ra, rb) and np.array_equal(sa, sb)


def test_rebuild_replaces_previous_index(tmp_path: Path) -> None:
    x = random_unit(300, 8, seed=14)
    build_index(x, IndexConfig(shard_size=100), tmp_path)
    build_index(x[:150], IndexConfig(), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard_*.faiss")) == ["shard_00000.faiss"]
    idx = AnnIndex.load(tmp_path, IndexConfig())
    assert idx.ntotal == 150 and idx.search(x[:2], 200)[1][:, 150:].max() == -1


# ------------------------------------------------------ (7) calibration on the mined queries


def test_search_breadth_is_calibrated_on_the_queries_not_the_corpus(tmp_path: Path) -> None:
    """Queries far from the documents (here: a document plus heavy noise) need a wider search
    than the build-time calibration on corpus vectors chose; calibrating on a sample of the
    queries restores the recall bar on *other* queries of the same kind."""
    from hardneg.stages.engines.faiss_index import calibrate_on_queries, exact_top_k
    from hardneg.stages.io import VectorFile

    x = gaussian_mixture(30_000, 32, n_clusters=200, spread=0.04, seed=11)
    np.save(tmp_path / "vectors.npy", x)
    cfg = IndexConfig(exact_threshold=1000)
    build_index(x, cfg, tmp_path / "faiss")
    built = json.loads((tmp_path / "faiss" / "index.json").read_text())["nprobe"]
    rng = np.random.default_rng(12)
    noisy = normalised(x[rng.choice(len(x), 600, replace=False)] + 0.25 * rng.standard_normal((600, 32), dtype=np.float32))
    sample, held_out = noisy[:256], noisy[256:]
    vectors = VectorFile(tmp_path / "vectors.npy")
    assert np.array_equal(exact_top_k(vectors, held_out[:20], 10), brute_force(x, held_out[:20], 10)[1])

    result = calibrate_on_queries(tmp_path / "faiss", vectors, sample, cfg, k=100)
    assert result["param"] == "nprobe" and result["value"] > built
    assert result["recall"][str(result["value"])] >= 0.97
    truth = brute_force(x, held_out, 100)[1]
    at_build = AnnIndex.load(tmp_path / "faiss", cfg).search(held_out, 100)[1]
    calibrated = AnnIndex.load(tmp_path / "faiss", cfg.model_copy(update={"nprobe": result["value"]})).search(held_out, 100)[1]
    assert recall(at_build, truth) < 0.95 <= recall(calibrated, truth)
    # A value fixed in the config is left alone.
    assert calibrate_on_queries(tmp_path / "faiss", vectors, sample, cfg.model_copy(update={"nprobe": 4}), k=100) is None


def test_vectors_file_places_each_shards_vectors_at_their_corpus_rows(tmp_path: Path) -> None:
    """The index stage's vectors file: row groups of several shards, decoded ahead in threads,
    land at their documents' corpus rows; ids outside the corpus are skipped; a repeated id keeps
    its last vector in file order (as one sequential pass would); a document without a vector is
    an error."""
    import pyarrow as pa

    from hardneg.stages.index import write_vectors
    from hardneg.stages.io import DocIds, ShardWriter

    n, d = 1_000, 8
    vectors = random_unit(n, d, 0)
    corpus = DocIds(pa.array([f"d{i}" for i in range(n)]))
    order = np.random.default_rng(1).permutation(n)
    ids = [f"d{i}" for i in order] + ["elsewhere", f"d{order[0]}"]
    repeat = random_unit(1, d, 2)[0]
    rows = np.vstack([vectors[order], random_unit(1, d, 3), repeat[None]])

    def table(lo: int, hi: int) -> pa.Table:
        return pa.table({"id": ids[lo:hi], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows[lo:hi].ravel()), d)})

    with ShardWriter(tmp_path / "emb", rows_per_shard=300) as writer:
        for lo in range(0, len(ids), 70):  # a record batch per write: several per shard
            writer.write(table(lo, min(lo + 70, len(ids))))
    assert len(list((tmp_path / "emb").glob("*.arrow"))) == 4
    matrix = write_vectors(tmp_path / "emb", corpus, tmp_path / "vectors.npy")
    expected = vectors.copy()
    expected[order[0]] = repeat
    assert np.array_equal(np.asarray(matrix), expected)

    with ShardWriter(tmp_path / "short") as writer:
        writer.write(table(0, n - 1))
    with pytest.raises(ValueError, match="1 corpus documents have no embedding"):
        write_vectors(tmp_path / "short", corpus, tmp_path / "short.npy")


def test_vectors_in_corpus_order_are_written_as_runs_beside_scattered_ones(tmp_path: Path) -> None:
    """Batches whose rows follow each other are written to the file directly, the others through
    the mapping: both land at their rows, and a later batch still overwrites an earlier one."""
    import pyarrow as pa

    from hardneg.stages.index import write_vectors
    from hardneg.stages.io import DocIds, ShardWriter

    n, d = 1_000, 8
    vectors = random_unit(n, d, 0)
    corpus = DocIds(pa.array([f"d{i}" for i in range(n)]))
    scattered = np.random.default_rng(1).permutation(np.arange(500, 600))
    order = np.concatenate([np.arange(0, 500), scattered, np.arange(600, n), np.arange(10, 20)])
    late = random_unit(10, d, 4)  # rows 10..19 again, in a run of their own, last in file order
    rows = np.vstack([vectors[order[:-10]], late])
    with ShardWriter(tmp_path / "emb", rows_per_shard=450) as writer:
        for lo in range(0, len(order), 100):
            hi = min(lo + 100, len(order))
            writer.write(pa.table({"id": [f"d{i}" for i in order[lo:hi]],
                                   "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows[lo:hi].ravel()), d)}))
    matrix = write_vectors(tmp_path / "emb", corpus, tmp_path / "vectors.npy")
    expected = vectors.copy()
    expected[10:20] = late
    assert np.array_equal(np.asarray(matrix), expected)
