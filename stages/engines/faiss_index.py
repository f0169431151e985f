"""FAISS index build + search for dense retrieval of hard-negative candidates.

All indexes use inner product; the caller's vectors are L2-normalised, so IP = cosine.

The ``auto`` rule (``IndexConfig.index == "auto"``), with ``n`` the corpus size and
``s = min(n, shard_size)`` the size of the largest shard:

* ``n <= exact_threshold``: ``"Flat"`` -- exact brute-force search.
* otherwise ``"IVF{nlist},{codes}"`` where
    - ``nlist = 4 * sqrt(s)`` rounded to the nearest power of two, capped at
      ``train_sample // 39`` (k-means needs ~39 training points per centroid)
      rounded down to a power of two;  100k vectors -> IVF1024, 1M -> IVF2048 with the
      default 100k training sample (IVF4096 with train_sample >= 160k);
    - ``codes`` from ``storage``: fp32 -> ``Flat`` (4*d bytes/vector), fp16 (the default,
      ``auto``) -> ``SQfp16`` (2*d bytes: the index only chooses *which* documents are
      candidates, and hardneg rescores every candidate exactly from the stored fp32 vectors,
      so half the memory costs no measurable recall), pq -> ``PQ{m}`` with ``m`` the largest divisor of d that is <= d/4
      (m bytes/vector, e.g. PQ96 for d=384). PQ is lossy enough that it usually cannot
      reach the recall bar; the build logs a warning with the recall it measured.
* ``nprobe`` (IVF) / ``efSearch`` (HNSW), unless set in the config, is *calibrated* at
  build time rather than guessed: 256 seeded corpus vectors are used as queries, their
  exact top-100 per shard is computed while the shard is being added (no extra pass
  over the data), and the smallest value on the grid 1, 2, 3, 4, 6, 8, 12, 16, ...
  whose recall@100 against that exact top-100 is >= 0.97 is kept (the bar is 0.95; the
  margin absorbs sampling noise and some query-distribution shift). Clustered data
  (typical embeddings) needs a few percent of the lists; near-uniform data may need most
  of them, and the calibration then honestly picks a large nprobe. The largest value
  over shards is stored in index.json.
  Searching with a much larger k than 100 needs a larger nprobe (set it in the config).

Corpora larger than ``shard_size`` are split into contiguous row ranges; the index is
trained once on a seeded sample of the whole corpus, and every shard is a copy of that
trained, empty index filled with its own rows, written as its own faiss file and searched
separately; per-query top-k lists are merged. Vectors are read in 65536-row chunks so a
memory-mapped ``.npy`` corpus is never materialised whole; shard files are loaded with
``IO_FLAG_MMAP_IFC`` so their codes are memory-mapped too.

GPU (``gpu`` "auto" with a usable GPU, or "on"): IVF k-means assignment and the adds run on
all visible GPUs (``index_cpu_to_all_gpus``, replicas); files are always written as CPU
indexes. ``load`` copies every shard to the GPUs (types faiss has no GPU version of, e.g.
HNSW, stay on CPU with a warning) and keeps the CPU copy, which answers any search with
k > 2048 (the faiss GPU k-selection limit) so no call silently returns fewer results.

Determinism: the training sample, the k-means / PQ seeds, the calibration queries and the
add order all derive from ``seed``; the same inputs give the same index files and results
on the same hardware (a GPU-built index may differ from a CPU-built one in float rounding).
HNSW insertion is multi-threaded in faiss and is not guaranteed to be bit-reproducible.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hardneg.stages.engines import lazy_module
from hardneg.stages.io import VectorFile, release_pages

faiss = lazy_module("faiss")  # 0.2 s to import: paid only by the stages that build or search

log = logging.getLogger(__name__)

INDEX_JSON = "index.json"
FORMAT_VERSION = 1
ADD_CHUNK = 65_536  # rows read from the (memory-mapped) corpus and added per call
GPU_MAX_K = 2048  # k (and nprobe) limit of faiss GPU selection kernels on many builds
MIN_POINTS_PER_CENTROID = 39  # below this faiss warns that k-means is under-trained
CALIBRATION_QUERIES = 256
CALIBRATION_K = 100
CALIBRATION_TARGET = 0.97
MERGE_BUDGET = 1 << 23  # (query, candidate) pairs held per search batch, ~100 MB


class IndexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str = "auto"
    exact_threshold: int = Field(100_000, ge=0)
    nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1)
    storage: Literal["auto", "fp32", "fp16", "pq"] = "auto"
    shard_size: int = Field(2_000_000, ge=1)
    train_sample: int = Field(100_000, ge=1)
    gpu: Literal["auto", "on", "off"] = "auto"
    seed: int = 0


def gpu_available() -> bool:
    """True when faiss can build and search on a GPU here (see `gpu_status`)."""
    return gpu_status()[0]


@functools.lru_cache(maxsize=None)
def gpu_status() -> tuple[bool, str]:
    """(usable, why not): faiss was built with GPU support, sees a GPU, and runs its kernels on
    it. The last is tried once per process, in a child process: a faiss build without kernels
    for the GPU's architecture (PyPI's faiss-gpu-cu12 has none for Hopper, sm_90) aborts the
    whole process on its first GPU call, which no except clause can catch."""
    try:
        if not hasattr(faiss, "StandardGpuResources"):
            return False, "this faiss has no GPU support (faiss-cpu)"
        if faiss.get_num_gpus() < 1:
            return False, "faiss sees no GPU"
    except Exception as err:  # a broken CUDA setup must not take the CPU path down with it
        return False, f"faiss cannot query its GPUs: {err}"
    usable, why = run_in_child(_GPU_PROBE)
    if not usable:
        log.warning("faiss sees a GPU but cannot run on it (%s): the index builds and searches on the CPU", why)
    return usable, why


# A tiny exact search on every visible GPU: the kernels the index uses, on the devices it would use.
_GPU_PROBE = (
    "import faiss, numpy as np\n"
    "x = np.eye(8, 64, dtype='float32')\n"
    "index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(64))\n"
    "index.add(x)\n"
    "assert index.search(x, 1)[1][:, 0].tolist() == list(range(8)), 'wrong GPU search results'\n"
)


def run_in_child(code: str, timeout: float = 300.0) -> tuple[bool, str]:
    """Run Python `code` in a child process: (it exited 0, its last error line otherwise)."""
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"a GPU check did not finish in {timeout:.0f} s"
    if child.returncode == 0:
        return True, ""
    lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
    # faiss's assertions end in "details: <the CUDA error>": that part says what went wrong.
    last = lines[-1].rsplit("details: ", 1)[-1] if lines else f"exit status {child.returncode}"
    return False, last[:300]


def auto_factory(n: int, d: int, n_train: int, storage: str) -> str:
    """Approximate-index factory string for a shard of ``n`` vectors (see module doc)."""
    nlist = _pow2_round(4 * math.sqrt(max(n, 1)))
    cap = 1 << int(math.log2(max(1, n_train // MIN_POINTS_PER_CENTROID)))
    nlist = max(1, min(nlist, cap))
    codes = {"auto": "SQfp16", "fp32": "Flat", "fp16": "SQfp16", "pq": f"PQ{_pq_m(d)}"}[storage]
    return f"IVF{nlist},{codes}"


def _pow2_round(x: float) -> int:
    return 1 << max(0, round(math.log2(x)))


def _pq_m(d: int) -> int:
    # ~4 dimensions per 8-bit sub-quantizer is the usual accuracy/size sweet spot.
    return max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)


def _use_gpu(cfg: IndexConfig) -> bool:
    if cfg.gpu == "off":
        return False
    available, why = gpu_status()
    if cfg.gpu == "on" and not available:
        raise ValueError(f"IndexConfig.gpu='on' but no GPU is usable ({why}); use gpu='auto' or 'off'")
    return available


def gpu_capable(index_dir: Path) -> bool:
    """Whether the built index's type has a faiss GPU version (Flat and IVF do, HNSW does not)."""
    path = Path(index_dir) / INDEX_JSON
    return not path.is_file() or "HNSW" not in json.loads(path.read_text())["factory"]


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """Copy to all visible GPUs (replicas). Raises RuntimeError for types faiss GPU lacks."""
    return faiss.index_cpu_to_all_gpus(index)


def _search_param(index: faiss.Index) -> str | None:
    """Name of the breadth knob of this index type, as faiss.ParameterSpace spells it."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if hasattr(faiss.downcast_index(index), "hnsw"):
        return "efSearch"
    return None


def _is_exact(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _rows(vectors: np.ndarray, start: int, stop: int) -> np.ndarray:
    # Slicing a memmap is lazy; this copies just the chunk, as contiguous float32 for faiss.
    return np.ascontiguousarray(vectors[start:stop], dtype=np.float32)


def _scattered_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """vectors[rows] (sorted rows) as contiguous float32. From a whole .npy memmap they are read
    by VectorFile.take, which releases each block's pages: gathering a random sample through the
    mapping in one go faulted in the pages around every row (the kernel's fault-around) and held
    most of the file resident at once (+1.3 GiB at a million 384-d vectors: the index stage's
    peak)."""
    source = VectorFile.behind(vectors)
    return np.ascontiguousarray(source.take(rows) if source is not None else vectors[rows], dtype=np.float32)


# --------------------------------------------------------------------------- build


def _template(cfg: IndexConfig, n: int, d: int, n_train: int):
    """The factory string the config asks for (auto: by corpus size) and its untrained index."""
    if cfg.index == "auto":
        exact = n <= cfg.exact_threshold
        factory = "Flat" if exact else auto_factory(min(n, cfg.shard_size), d, n_train, cfg.storage)
    else:
        factory = cfg.index
    try:
        return factory, faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid faiss index_factory string {factory!r}: {e}") from e


def _index_meta(cfg: IndexConfig, factory: str, n: int, d: int, param: str | None, value, train_sample: int,
                use_gpu: bool, calib_q: np.ndarray | None, calibration: list[dict], shards_meta: list[dict]) -> dict:
    """index.json: what a search needs to open the shards, and how the index was built."""
    return {
        "format_version": FORMAT_VERSION,
        "factory": factory,
        "metric": "inner_product",
        "dim": d,
        "ntotal": n,
        "nprobe": value if param == "nprobe" else None,
        "efSearch": value if param == "efSearch" else None,
        "storage": ("fp16" if cfg.storage == "auto" else cfg.storage) if cfg.index == "auto" and factory != "Flat" else None,
        "seed": cfg.seed,
        "train_sample": train_sample,
        "built_on": "gpu" if use_gpu else "cpu",
        "calibration": (
            {"k": CALIBRATION_K, "queries": len(calib_q), "target": CALIBRATION_TARGET, "param": param,
             "shards": calibration}
            if calibration
            else None
        ),
        "shards": shards_meta,
    }


def _write_shards(template, vectors: np.ndarray, shard_size: int, out_dir: Path, use_gpu: bool, param: str | None,
                  calib_q: np.ndarray | None) -> tuple[list[dict], list[dict], list[int]]:
    """Fill and write one index per `shard_size` rows; where a search parameter is calibrated,
    each shard's recall curve and the value it needs."""
    n = len(vectors)
    shards_meta: list[dict] = []
    calibration: list[dict] = []
    chosen: list[int] = []
    for si, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        t1 = time.perf_counter()
        index, gt = _fill_shard(faiss.clone_index(template), vectors, start, stop, use_gpu, calib_q)
        if gt is not None:
            value, curve = _calibrate(index, param, calib_q, gt)
            chosen.append(value)
            calibration.append({"shard": si, "recall": curve})
        name = f"shard_{si:05d}.faiss"
        _write_atomic(index, out_dir / name)
        shards_meta.append({"file": name, "offset": start, "count": stop - start})
        log.info("shard %d: rows %d..%d in %.1fs", si, start, stop, time.perf_counter() - t1)
        del index
    return shards_meta, calibration, chosen


def build_index(vectors: np.ndarray, cfg: IndexConfig, out_dir: Path) -> None:
    """Build the index over ``vectors`` (n, d) and write shard files + index.json."""
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, d), got shape {vectors.shape}")
    n, d = vectors.shape
    use_gpu = _use_gpu(cfg)

    n_train = min(cfg.train_sample, n)
    factory, template = _template(cfg, n, d, n_train)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # index.json is written last and marks a complete build: drop any old one first so an
    # interrupted rebuild is never mistaken for a finished index.
    (out_dir / INDEX_JSON).unlink(missing_ok=True)

    # Random order (not sorted) so its head is a uniform sample usable as calibration queries.
    rng = np.random.default_rng(cfg.seed)
    order = rng.choice(n, size=n_train, replace=False) if n else np.zeros(0, np.int64)
    param = _search_param(template)
    user_value = {"nprobe": cfg.nprobe, "efSearch": cfg.ef_search}.get(param) if param else None
    calib_q: np.ndarray | None = None
    if param and user_value is None and n:
        calib_q = _scattered_rows(vectors, np.sort(order[:CALIBRATION_QUERIES]))

    t0 = time.perf_counter()
    needs_training = not template.is_trained
    if needs_training:
        if n == 0:
            raise ValueError(f"index {factory!r} needs training but the corpus is empty")
        sample = _scattered_rows(vectors, np.sort(order))
        _train(template, sample, cfg.seed, use_gpu)
        del sample
        log.info("trained %s on %d vectors in %.1fs", factory, n_train, time.perf_counter() - t0)

    shards_meta, calibration, chosen = _write_shards(template, vectors, cfg.shard_size, out_dir, use_gpu, param, calib_q)

    value = user_value if user_value is not None else (max(chosen) if chosen else None)
    if param and value is None:  # nothing to calibrate on (empty corpus): faiss-ish defaults
        value = 1 if param == "nprobe" else 16
    meta = _index_meta(cfg, factory, n, d, param, value, n_train if needs_training else 0, use_gpu,
                       calib_q, calibration, shards_meta)
    tmp = out_dir / (INDEX_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / INDEX_JSON)
    _remove_stale_shards(out_dir, {s["file"] for s in shards_meta})
    log.info("built %s over %d vectors (%d shards) in %.1fs", factory, n, len(shards_meta),
             time.perf_counter() - t0)


def _train(index: faiss.Index, sample: np.ndarray, seed: int, use_gpu: bool) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    for part in (index, ivf):  # PQ codes live on the IVF, or on the top index for IndexPQ
        part = faiss.downcast_index(part) if part is not None else None
        if getattr(part, "pq", None) is not None:
            part.pq.cp.seed = seed
        if getattr(part, "do_polysemous_training", False):
            # index_factory turns this on, but it only serves polysemous Hamming filtering,
            # which we never use, and it dominates PQ training time (minutes at scale).
            part.do_polysemous_training = False
    gpu_flat = None  # held here: the SWIG pointer on the IVF does not keep it alive
    if use_gpu and ivf is not None:
        # k-means assignment dominates training; run it on the GPUs but keep faiss's CPU
        # training driver so the seed / spherical settings above still apply.
        gpu_flat = _to_gpu(faiss.IndexFlat(index.d, index.metric_type))
        ivf.clustering_index = gpu_flat
    index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None


def _fill_shard(
    index: faiss.Index,
    vectors: np.ndarray,
    start: int,
    stop: int,
    use_gpu: bool,
    calib_q: np.ndarray | None,
) -> tuple[faiss.Index, tuple[np.ndarray, np.ndarray] | None]:
    """Add rows [start, stop) chunk by chunk; also collect the exact top-k of calib_q."""
    target = index
    # Only IVF gains from a GPU during add (coarse assignment); Flat is a memcpy and HNSW
    # has no faiss GPU implementation.
    if use_gpu and faiss.try_extract_index_ivf(index) is not None:
        try:
            target = _to_gpu(index)
        except RuntimeError as e:
            log.warning("cannot build %s on GPU (%s); adding on CPU", type(index).__name__, e)
    top = _TopK(calib_q, min(CALIBRATION_K, stop - start)) if calib_q is not None else None
    for c0 in range(start, stop, ADD_CHUNK):
        x = _rows(vectors, c0, min(c0 + ADD_CHUNK, stop))
        release_pages(vectors)  # one chunk resident at a time, however large the corpus
        target.add(x)
        if top is not None:
            top.add(x, c0 - start)  # shard-local ids, as the shard index returns
    if target is not index:
        index = faiss.index_gpu_to_cpu(target)
    if top is None:
        return index, None
    return index, (top.scores, top.rows)


class _TopK:
    """The exact top-k rows by inner product of a few queries (the calibrations' reference),
    over blocks of rows added in increasing row order: numpy's sgemm per block, ties by the
    lower row. Not faiss.knn: for 256 queries x 384 dims faiss >= 1.12 takes its non-BLAS scan
    (meant for many cores), several times slower on a few. Once every query holds k rows, a
    block adds only the scores above a query's current k-th (an equal score has a higher row and
    loses): a few per block, merged by one small sort."""

    BLOCK = 16_384  # rows scored at once: a 16 MB score matrix for 256 queries

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.rows = np.zeros((len(queries), 0), dtype=np.int64)

    def add(self, x: np.ndarray, offset: int) -> None:
        m = len(self.queries)
        for b0 in range(0, len(x), self.BLOCK):
            scores = self.queries @ np.ascontiguousarray(x[b0:b0 + self.BLOCK], dtype=np.float32).T
            n = scores.shape[1]
            if self.scores.shape[1] < self.k:  # not yet k rows each: the block's top k, ties included
                floor = np.partition(scores, n - self.k, axis=1)[:, n - self.k:n - self.k + 1] if n > self.k else -np.inf
                q, column = np.nonzero(scores >= floor)
            else:
                q, column = np.nonzero(scores > self.scores[:, -1:])
                if len(q) == 0:
                    continue
            held = self.scores.shape[1]
            fq = np.concatenate([np.repeat(np.arange(m), held), q])
            fs = np.concatenate([self.scores.ravel(), scores[q, column]])
            fr = np.concatenate([self.rows.ravel(), column + (offset + b0)])
            order = np.lexsort((fr, -fs, fq))  # query, then score desc, then row
            width = min(self.k, held + n)
            counts = np.bincount(fq, minlength=m)
            at = order[((np.cumsum(counts) - counts)[:, None] + np.arange(width)).ravel()]
            self.scores, self.rows = fs[at].reshape(m, width), fr[at].reshape(m, width)


def _grid(index: faiss.Index, param: str, k: int) -> list[int]:
    """Values to try, cheapest first: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and the midpoints
    between them, so the pick overshoots the needed search cost by at most 1.5x)."""
    grid = sorted({v for i in range(20) for v in (1 << i, 3 << i >> 1) if v >= 1})
    if param == "nprobe":
        nlist = faiss.try_extract_index_ivf(index).nlist
        # nprobe = nlist scans every list: the best this IVF can do.
        return [v for v in grid if v < nlist] + [nlist]
    return [v for v in grid if max(k, 16) <= v <= 8192]


def _pick(search: Callable[[int], np.ndarray], values: list[int], truth: np.ndarray, what: str, param: str) -> tuple[int, dict[str, float]]:
    """The smallest value whose recall@k (`search(value)` against `truth`) is >= CALIBRATION_TARGET."""
    curve: dict[str, float] = {}
    for v in values:
        curve[str(v)] = _recall(search(v), truth)
        if curve[str(v)] >= CALIBRATION_TARGET:
            return v, curve
    # Target unreachable (lossy codes such as PQ): take the cheapest value on the plateau.
    best = max(curve.values())
    value = next(int(v) for v, r in curve.items() if r >= best - 0.01)
    log.warning(
        "%s: recall@%d reaches only %.3f (< %.2f) even at the largest %s; using %s=%d. "
        "Use storage fp32/fp16 or a larger code for higher recall.",
        what, truth.shape[1], best, CALIBRATION_TARGET, param, param, value,
    )
    return value, curve


def _calibrate(
    index: faiss.Index, param: str, q: np.ndarray, gt: tuple[np.ndarray, np.ndarray]
) -> tuple[int, dict[str, float]]:
    """Smallest nprobe/efSearch on the grid with recall@k >= CALIBRATION_TARGET."""
    k = gt[1].shape[1]
    params = faiss.ParameterSpace()

    def search(v: int) -> np.ndarray:
        params.set_index_parameter(index, param, v)
        return index.search(q, k)[1]

    return _pick(search, _grid(index, param, k), gt[1], type(faiss.downcast_index(index)).__name__, param)


def exact_top_k(vectors, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows of the exact top-k by inner product of `vectors` (anything with `len()` and
    `rows(start, stop)`, such as stages.io.VectorFile), scanned in chunks."""
    top = _TopK(queries, min(k, len(vectors)))
    for c0 in range(0, len(vectors), ADD_CHUNK):
        top.add(vectors.rows(c0, min(c0 + ADD_CHUNK, len(vectors))), c0)
    return top.rows


def open_search_param(index_dir: Path, cfg: IndexConfig) -> str | None:
    """The built index's search parameter ("nprobe" or "efSearch") when the config leaves its value
    open; None for exact indices and for values the user fixed."""
    meta = json.loads((Path(index_dir) / INDEX_JSON).read_text())
    param = "nprobe" if meta.get("nprobe") is not None else "efSearch" if meta.get("efSearch") is not None else None
    fixed = {"nprobe": cfg.nprobe, "efSearch": cfg.ef_search}.get(param) if param else None
    return param if fixed is None else None


def calibrate_on_queries(index_dir: Path, vectors, queries: np.ndarray, cfg: IndexConfig, k: int) -> dict | None:
    """Choose nprobe (IVF) or efSearch (HNSW) on the queries to be mined rather than on corpus
    vectors: queries sit further from the documents than documents from each other, so a value
    calibrated at build time can fall well short of the recall bar on them. Recall@k is measured
    against exact search over the stored vectors. None when the index is exact or the value is
    fixed in the config."""
    param = open_search_param(index_dir, cfg)
    if param is None or len(queries) == 0:
        return None
    ann = AnnIndex.load(index_dir, cfg.model_copy(update={"gpu": "off"}))
    k = min(k, ann.ntotal)
    truth = exact_top_k(vectors, queries, k)
    params = faiss.ParameterSpace()

    def search(v: int) -> np.ndarray:
        for shard in ann._shards:
            params.set_index_parameter(shard.cpu, param, v)
        return ann.search(queries, k)[1]

    value, curve = _pick(search, _grid(ann._shards[0].cpu, param, k), truth, ann.factory, param)
    return {"param": param, "value": value, "k": k, "queries": len(queries), "target": CALIBRATION_TARGET,
            "recall": curve}


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(np.intersect1d(f[f >= 0], t[t >= 0]).size for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def _write_atomic(index: faiss.Index, path: Path) -> None:
    # Write-then-rename: a reader that memory-mapped the old file keeps a valid mapping.
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    for p in out_dir.glob("shard_*.faiss"):
        if p.name not in keep:
            p.unlink()


# -------------------------------------------------------------------------- search


@dataclass
class _Shard:
    offset: int
    count: int
    cpu: faiss.Index
    gpu: faiss.Index | None


def _read_index(path: Path) -> faiss.Index:
    # IO_FLAG_MMAP_IFC maps Flat/IVF/SQ/PQ codes in place instead of reading them into RAM;
    # fall back to a plain read for types that do not support it.
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path))


class AnnIndex:
    """A built index (one or more shards) loaded for search."""

    def __init__(self, meta: dict, shards: list[_Shard], nprobe: int | None, ef_search: int | None):
        self.meta = meta
        self.factory: str = meta["factory"]
        self.dim: int = meta["dim"]
        self.ntotal: int = meta["ntotal"]
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._shards = shards
        exact = all(_is_exact(s.cpu) for s in shards) if shards else self.factory == "Flat"
        device = "gpu" if any(s.gpu is not None for s in shards) else "cpu"
        n = len(shards)
        extra = f", nprobe={nprobe}" if nprobe else f", efSearch={ef_search}" if ef_search else ""
        self.description = (
            f"{self.factory} ({'exact' if exact else 'approx'}, {n} shard{'' if n == 1 else 's'}, "
            f"{device}{extra})"
        )

    @classmethod
    def load(cls, out_dir: Path, cfg: IndexConfig) -> AnnIndex:
        out_dir = Path(out_dir)
        meta = json.loads((out_dir / INDEX_JSON).read_text())
        if meta.get("metric") != "inner_product":
            raise ValueError(f"{out_dir}: unsupported metric {meta.get('metric')!r}")
        use_gpu = _use_gpu(cfg)
        nprobe = cfg.nprobe if cfg.nprobe is not None else meta.get("nprobe")
        ef = cfg.ef_search if cfg.ef_search is not None else meta.get("efSearch")
        shards = []
        for s in meta["shards"]:
            cpu = _read_index(out_dir / s["file"])
            param = _search_param(cpu)
            value = {"nprobe": nprobe, "efSearch": ef}.get(param) if param else None
            if value is not None:
                faiss.ParameterSpace().set_index_parameter(cpu, param, int(value))
            gpu = None
            if use_gpu:
                if param == "nprobe" and value is not None and value > GPU_MAX_K:
                    log.warning("nprobe=%d exceeds the GPU limit %d; searching %s on CPU",
                                value, GPU_MAX_K, s["file"])
                else:
                    try:
                        gpu = _to_gpu(cpu)  # nprobe set above is copied with the index
                    except RuntimeError as e:
                        log.warning("%s cannot run on GPU (%s); searching it on CPU", s["file"], e)
            shards.append(_Shard(s["offset"], s["count"], cpu, gpu))
        return cls(meta, shards, nprobe, ef)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores (m,k) float32 desc, global rows (m,k) int64)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (m, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        m = len(q)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        rows = np.full((m, k), -1, dtype=np.int64)
        if m == 0 or not self._shards:
            return scores, rows
        force_cpu = k > GPU_MAX_K and any(s.gpu is not None for s in self._shards)
        if force_cpu:
            # GPU k-selection is capped; answering from the CPU copy keeps all k results.
            log.warning("k=%d exceeds the faiss GPU limit %d; searching on CPU", k, GPU_MAX_K)
        batch = max(1, min(16_384, MERGE_BUDGET // (k * len(self._shards))))
        for b0 in range(0, m, batch):
            qb = q[b0 : b0 + batch]
            parts = [self._search_shard(s, qb, k, force_cpu) for s in self._shards]
            if len(parts) == 1:
                D, I = parts[0]
            else:
                D = np.concatenate([p[0] for p in parts], axis=1)
                I = np.concatenate([p[1] for p in parts], axis=1)
                # Stable sort: equal scores keep shard order, i.e. the lower row wins.
                top = np.argsort(-D, axis=1, kind="stable")[:, :k]
                D = np.take_along_axis(D, top, axis=1)
                I = np.take_along_axis(I, top, axis=1)
            scores[b0 : b0 + len(qb)] = D
            rows[b0 : b0 + len(qb)] = I
        return scores, rows

    @staticmethod
    def _search_shard(
        s: _Shard, q: np.ndarray, k: int, force_cpu: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        index = s.gpu if s.gpu is not None and not force_cpu else s.cpu
        D, I = index.search(q, k)
        missing = I < 0
        # faiss pads with -1 / -FLT_MAX; the contract is -1 / -inf, with global row numbers.
        I = np.where(missing, -1, I + s.offset)
        D = np.where(missing, -np.inf, D).astype(np.float32, copy=False)
        return D, I
