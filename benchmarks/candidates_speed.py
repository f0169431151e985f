"""The candidates stage, vectorised vs the per-query implementation it replaced (kept as the
reference in tests/test_candidates_vectorised.py), on the same synthetic corpus, index and
queries as benchmarks/scale.py. Batches alternate between the two (new, old, new, old, ...), so a
machine whose load changes during the run slows both alike; every batch's two outputs are
compared too. Printed: µs per query of each, and the ratio, for the run's own index (exact Flat
at 100k documents) and for an IVF index searched at nprobe 3 (as the 1M run's is), where search
is cheap and the rest of the stage is what costs.

    python benchmarks/candidates_speed.py --docs 100000 --queries 2560
    python benchmarks/candidates_speed.py --folder DIR   # reuse a folder made by an earlier run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def prepare(folder: Path, n_docs: int, n_queries: int) -> Path:
    """Inputs as scale.py makes them, mined once (dense + BM25) so the index files exist."""
    from benchmarks.scale import make_inputs
    from hardneg import MineConfig, run_mine

    if not (folder / "beir").exists():
        make_inputs(folder, n_docs, n_queries)
    if not (folder / "out").exists():
        run_mine(MineConfig(beir=folder / "beir", out=folder / "out", work_dir=folder / "work",
                            corpus_embeddings=folder / "corpus.npy", query_embeddings=folder / "queries.npy",
                            miners=["dense", "bm25"], num_negatives=5, runner="local"), progress=False)
    return folder / "work"


def ivf_copy(index_dir: Path, target: Path):
    """The same vectors under an IVF index with fp16 codes, searched at nprobe 3."""
    from hardneg.stages.engines.faiss_index import IndexConfig, build_index

    if not (target / "faiss" / "index.json").exists():
        shutil.copytree(index_dir, target, ignore=shutil.ignore_patterns("faiss"), dirs_exist_ok=True)
        config = IndexConfig(index="IVF1024,SQfp16", nprobe=3, exact_threshold=0, gpu="off")
        build_index(np.load(target / "vectors.npy", mmap_mode="r"), config, target / "faiss")
    return target, IndexConfig(index="IVF1024,SQfp16", nprobe=3, exact_threshold=0, gpu="off")


def compare(work: Path, index_dir: Path, index_config, batches: int, batch_size: int) -> tuple[float, float, int]:
    from test_candidates_vectorised import _PerQuery

    from hardneg.stages.engines.bm25 import BM25Config
    from hardneg.stages.candidates import CandidatesStage
    from hardneg.stages.io import read_table

    queries = read_table(sorted(work.glob("query_vectors-*"))[0])
    args = dict(miners=["dense", "bm25"], range_max=100, rrf_k=60, index_dir=index_dir, index_config=index_config,
                bm25_dir=sorted(work.glob("bm25_index-*"))[0], bm25_config=BM25Config(), score_bm25=True)
    new, old = CandidatesStage(**args), _PerQuery(**args)
    new.ensure_setup()
    old.ensure_setup()
    spent = {"new": 0.0, "old": 0.0}
    n = 0
    for b in range(min(batches, queries.num_rows // batch_size)):
        batch = queries.slice(b * batch_size, batch_size)
        outputs = {}
        for name, stage in (("new", new), ("old", old)):
            started = time.perf_counter()
            outputs[name] = stage(batch)
            spent[name] += time.perf_counter() - started
        assert outputs["new"].equals(outputs["old"]), f"batch {b}: the outputs differ"
        n += batch.num_rows
    return spent["new"] / n * 1e6, spent["old"] / n * 1e6, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2560)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--folder", type=Path, help="reuse (or create) this folder instead of a temp one")
    opts = parser.parse_args()
    folder = opts.folder or Path(tempfile.mkdtemp(prefix="hardneg-candidates-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        work = prepare(folder, opts.docs, opts.queries)
        index_dir = sorted(work.glob("index-*"))[0]
        from hardneg.stages.engines.faiss_index import IndexConfig
        from hardneg.stages.calibrate import calibrated_config

        config = IndexConfig(gpu="off")
        for calibration in work.glob("calibrate-*"):
            config = calibrated_config(config, calibration)
        variants = [("the run's index", index_dir, config), ("IVF1024,SQfp16 nprobe 3", *ivf_copy(index_dir, folder / "ivf"))]
        print(f"{opts.docs:,} documents, batches of {opts.batch_size} queries, dense + BM25 miners, range_max 100")
        print(f"{'index':<26}{'queries':>9}{'vectorised µs/q':>17}{'per-query µs/q':>16}{'speed-up':>10}")
        for label, directory, index_config in variants:
            new, old, n = compare(work, directory, index_config, opts.batches, opts.batch_size)
            print(f"{label:<26}{n:>9}{new:>17.0f}{old:>16.0f}{old / new:>9.1f}x   (outputs identical)")
    finally:
        if opts.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
