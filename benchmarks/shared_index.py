"""The index once per node: two candidates actors on one node share the FAISS index's and the
BM25 index's pages (both memory-mapped read-only), so together they hold little more than one.

A two-node Ray cluster is started on loopback (`ray start`, a head and a worker node, 2 CPUs
each, private temp dir and ports, stopped by its own pids; tests/resilience.py), and two
candidates actors are pinned to each node. Each loads a synthetic index (normalised
Gaussian-mixture vectors, dim 384, an exact Flat index so that one batch of queries touches every
page of it; BM25 over Zipfian text) and mines one batch of 256 queries. Per node it prints each
actor's RSS, USS (pages only it maps) and PSS, and the node's two actors together: their USS
plus the pages they share counted once, against one actor's RSS (target <= 1.3x). "USS growth" is
an actor's private memory gained from loading the index and mining the batch.

    python benchmarks/shared_index.py                 # 300k documents (~0.5 GB index)
    python benchmarks/shared_index.py --docs 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
DIM = 384
CHUNK = 100_000


def build(folder: Path, n_docs: int, n_queries: int = 256, seed: int = 0):
    """An index dir as the index stage writes it (vectors.npy, ids, faiss/), a BM25 index and a
    batch of queries with the columns the candidates stage reads."""
    import pyarrow as pa

    from benchmarks.scale import mixture_vectors, zipf_texts
    from hardneg import schemas
    from hardneg.stages.engines.faiss_index import IndexConfig, build_index
    from hardneg.stages.engines.bm25 import BM25Config, BM25Index
    from hardneg.stages.io import ShardWriter

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, DIM)).astype(np.float32)
    index_dir = folder / "index"
    index_dir.mkdir(parents=True)
    vectors = np.lib.format.open_memmap(index_dir / "vectors.npy", mode="w+", dtype=np.float32, shape=(n_docs, DIM))
    ids = [f"d{i}" for i in range(n_docs)]
    with ShardWriter(index_dir / "ids", pa.schema([("doc_id", pa.string())])) as writer:
        for start in range(0, n_docs, CHUNK):
            n = min(CHUNK, n_docs - start)
            vectors[start:start + n] = mixture_vectors(rng, centers, n)
            writer.write(pa.table({"doc_id": ids[start:start + n]}))
    vectors.flush()
    config = IndexConfig(index="Flat", gpu="off")
    build_index(np.load(index_dir / "vectors.npy", mmap_mode="r"), config, index_dir / "faiss")
    bm25 = BM25Config()
    BM25Index.build(ids, zipf_texts(rng, n_docs, 12), bm25).save(folder / "bm25")
    targets = np.sort(rng.choice(n_docs, size=n_queries, replace=False))
    q = vectors[targets] + 0.07 * rng.standard_normal((n_queries, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    positives = [[ids[t]] for t in targets]
    queries = pa.table({
        "query_id": [f"q{i}" for i in range(n_queries)], "text": zipf_texts(rng, n_queries, 6),
        "pair_ids": [[f"p{i}"] for i in range(n_queries)], "pair_order": [[i] for i in range(n_queries)],
        "positive_ids": positives, "mask_ids": positives,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), DIM),
    }, schema=pa.schema(list(schemas.QUERIES) + [("embedding", pa.list_(pa.float32(), DIM))]))
    return index_dir, folder / "bm25", config, bm25, queries


def candidates_stage(index_dir: Path, bm25_dir: Path, index_config, bm25_config):
    from hardneg.stages.candidates import CandidatesStage

    return CandidatesStage(miners=["dense", "bm25"], range_max=100, rrf_k=60, index_dir=index_dir,
                           index_config=index_config, bm25_dir=bm25_dir, bm25_config=bm25_config)


class Probe:
    """A candidates worker as the Ray runner makes one: the stage set up once in the actor."""

    def __init__(self, stage) -> None:
        import psutil

        # The libraries first: `before` is the worker's memory without an index.
        import hardneg.stages.engines.faiss_index  # noqa: F401
        import hardneg.stages.engines.bm25  # noqa: F401

        self.before = psutil.Process().memory_full_info().uss
        self.stage = stage
        self.stage.ensure_setup()

    def searched_on(self) -> str:
        """The loaded index's description, which names the device it searches on."""
        return self.stage._ann.description

    def mine(self, batch) -> tuple[int, int, int]:
        """(pid, private memory before the index was loaded, rows mined)."""
        return os.getpid(), self.before, self.stage.transform(batch).num_rows


def memory(pid: int, files: list[Path]) -> dict[str, int]:
    """RSS, USS, PSS of a process and how much of the index files it maps is resident / private."""
    import psutil

    proc = psutil.Process(pid)
    full = proc.memory_full_info()
    names = {str(f) for f in files}
    maps = [m for m in proc.memory_maps(grouped=True) if m.path in names]
    return {"rss": full.rss, "uss": full.uss, "pss": full.pss,
            "index_rss": sum(m.rss for m in maps), "index_private": sum(m.private_clean + m.private_dirty for m in maps)}


def index_files(index_dir: Path, bm25_dir: Path) -> list[Path]:
    return sorted((index_dir / "faiss").glob("*.faiss")) + sorted((bm25_dir / "bm25s").glob("*.npy"))


def together(a: dict[str, int], b: dict[str, int]) -> int:
    """Resident pages of two processes counted once: each one's private pages plus the shared."""
    return a["uss"] + b["uss"] + max(a["rss"] - a["uss"], b["rss"] - b["uss"])


def measure_on_cluster(address: str, stage, queries, files: list[Path]) -> dict[str, list[dict[str, int]]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        remote = ray.remote(num_cpus=1)(Probe)
        out: dict[str, list[dict[str, int]]] = {}
        for node in nodes:
            strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            actors = [remote.options(scheduling_strategy=strategy).remote(stage) for _ in range(2)]
            done = ray.get([a.mine.remote(queries) for a in actors])
            out[node] = [{**memory(pid, files), "before": before} for pid, before, _ in done]
        return out
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=300_000)
    opts = parser.parse_args()
    from resilience import RayCluster

    folder = Path(tempfile.mkdtemp(prefix="hardneg-shared-"))
    cluster = None
    try:
        t = time.perf_counter()
        index_dir, bm25_dir, index_config, bm25_config, queries = build(folder, opts.docs)
        files = index_files(index_dir, bm25_dir)
        size = sum(f.stat().st_size for f in files)
        print(f"{opts.docs:,} documents: index files {size / 2**20:.0f} MiB (FAISS Flat + bm25s), built in "
              f"{time.perf_counter() - t:.0f}s")
        for attempt in range(3):  # a node's start times out (30 s in Ray) on a busy machine: retry
            cluster = RayCluster(cpus_per_node=2)
            try:
                cluster.start()
                break
            except RuntimeError as err:
                cluster.stop()
                if attempt == 2:
                    raise SystemExit(f"could not start a two-node Ray cluster: {str(err)[-300:]}")
        os.environ.update(cluster.env)
        per_node = measure_on_cluster(cluster.address, candidates_stage(index_dir, bm25_dir, index_config, bm25_config),
                                      queries, files)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    mib = 2 ** 20
    print(f"{'node':<8}{'actor':>6}{'RSS MiB':>10}{'USS MiB':>10}{'PSS MiB':>10}{'USS growth':>12}"
          f"{'index resident':>16}{'index private':>15}")
    ratios = []
    for n, (node, actors) in enumerate(per_node.items()):
        for i, m in enumerate(actors):
            print(f"{n:<8}{i:>6}{m['rss'] / mib:>10.0f}{m['uss'] / mib:>10.0f}{m['pss'] / mib:>10.0f}"
                  f"{(m['uss'] - m['before']) / mib:>12.0f}"
                  f"{m['index_rss'] / mib:>16.0f}{m['index_private'] / mib:>15.0f}")
        both, one = together(*actors), actors[0]["rss"]
        ratios.append(both / one)
        print(f"node {n}: two actors together {both / mib:.0f} MiB vs one actor's RSS {one / mib:.0f} MiB = "
              f"{both / one:.2f}x (target <= 1.3x; unshared it would be {sum(a['rss'] for a in actors) / one:.2f}x)")
    print(f"worst node: {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
