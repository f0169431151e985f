"""Mining from vectors made elsewhere (`--corpus-embeddings`, `query_embeddings`) with an
approximate index: the search breadth is calibrated on the queries, and the dense candidates
are (almost all of) the exact nearest documents."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import make_inputs  # noqa: E402  (the benchmark's generator: one definition)

from hardneg.pipeline.config import MineConfig  # noqa: E402
from hardneg.pipeline.runner import Pipeline  # noqa: E402
from hardneg.stages.io import read_table  # noqa: E402


def test_precomputed_vectors_with_an_approximate_index(tmp_path):
    inputs = make_inputs(tmp_path / "in", n_docs=6000, n_queries=300)
    config = MineConfig(beir=inputs["beir"], out=tmp_path / "out", work_dir=tmp_path / "work",
                        corpus_embeddings=inputs["corpus"], query_embeddings=inputs["queries"],
                        miners=["dense"], runner="local", index={"exact_threshold": 1000})
    result = Pipeline(config, progress=False).run()
    assert result.computed[:2] == ["ingest", "query_vectors"] and "calibrate" in result.computed
    assert result.stats["input_pairs"] == 300 == result.stats["output_pairs"] + sum(result.stats["rejected_pairs"].values())

    work = tmp_path / "work"
    calibration = json.loads(next(work.glob("calibrate-*")).joinpath("calibration.json").read_text())
    assert calibration["param"] == "nprobe" and calibration["recall"][str(calibration["value"])] >= 0.97

    # Dense candidates against exact search over the same normalised vectors.
    corpus = np.load(inputs["corpus"])
    corpus_ids = np.array(Path(str(inputs["corpus"]).replace(".npy", ".ids.txt")).read_text().split())
    queries = np.load(inputs["queries"])
    query_ids = Path(str(inputs["queries"]).replace(".npy", ".ids.txt")).read_text().split()
    candidates = read_table(next(work.glob("candidates-*"))).to_pylist()
    assert len(candidates) == 300
    hits = total = 0
    for row in candidates:
        q = queries[query_ids.index(row["query_id"])]
        order = np.argsort(-(corpus @ q), kind="stable")
        exact = [d for d in corpus_ids[order[:120]] if d not in row["mask_ids"]][: len(row["candidate_ids"])]
        hits += len(set(exact) & set(row["candidate_ids"]))
        total += len(exact)
    assert hits / total >= 0.95


def test_a_vectors_hash_started_ahead_is_the_files_hash_and_a_changed_file_is_hashed_again(tmp_path):
    from hardneg.stages.ingest import file_fingerprint, fingerprint_ahead

    path = tmp_path / "vectors.npy"
    np.save(path, np.ones((100, 4), np.float32))
    direct = file_fingerprint(path)
    fingerprint_ahead(path, tmp_path / "missing.npy")  # a missing file is left to the stage
    assert file_fingerprint(path) == direct
    fingerprint_ahead(path)
    np.save(path, np.zeros((101, 4), np.float32))  # changed after its hash was started
    changed = file_fingerprint(path)
    assert changed != direct
    np.save(path, np.ones((100, 4), np.float32))
    assert file_fingerprint(path) == direct
