"""Calibrate: set the approximate index's search breadth (nprobe / efSearch) on the queries being
mined. The index build calibrates on corpus vectors, but queries lie further from the documents
than documents from each other, and a value that gives recall@100 = 0.97 on the corpus can give
0.87 on the queries. This stage measures recall on a seeded sample of the real queries against
exact search over the stored vectors and keeps the cheapest value that reaches the bar.

It runs only for approximate indices whose search value the config leaves open.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hardneg.stages.engines.faiss_index import CALIBRATION_TARGET, IndexConfig, calibrate_on_queries, open_search_param
from hardneg.stages.base import GlobalStage
from hardneg.stages.io import VectorFile, count_rows, embedding_matrix, iter_batches

CALIBRATION_FILE = "calibration.json"


class CalibrateStage(GlobalStage):
    name = "calibrate"
    version = "2"  # 2: the exact reference top-k by numpy sgemm, not faiss.knn

    def __init__(self, index: IndexConfig, k: int, sample: int = 256, seed: int = 0) -> None:
        self.index = index
        self.k = k
        self.sample = sample
        self.seed = seed

    def fingerprint_config(self) -> dict[str, Any]:
        return {"k": self.k, "sample": self.sample, "seed": self.seed, "target": CALIBRATION_TARGET}

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
        n = count_rows(inputs["queries"])
        wanted = np.sort(np.random.default_rng(self.seed).choice(n, size=min(n, self.sample), replace=False))
        picked, seen = [], 0
        for batch in iter_batches(inputs["queries"], 4096, columns=["embedding"]):
            local = wanted[(wanted >= seen) & (wanted < seen + batch.num_rows)] - seen
            if len(local):
                picked.append(embedding_matrix(batch)[local])
            seen += batch.num_rows
        queries = np.concatenate(picked).astype(np.float32) if picked else np.zeros((0, 1), np.float32)
        index_dir = Path(inputs["index"])
        result = calibrate_on_queries(index_dir / "faiss", VectorFile(index_dir / "vectors.npy"), queries,
                                      self.index, self.k)
        (Path(out_dir) / CALIBRATION_FILE).write_text(json.dumps(result, indent=2))
        return {"param": result["param"], "value": result["value"]} if result else {}


def calibrated_config(index: IndexConfig, calibration_dir: Path) -> IndexConfig:
    """The index config with the calibrated search value filled in."""
    result = json.loads((Path(calibration_dir) / CALIBRATION_FILE).read_text())
    if not result:
        return index
    return index.model_copy(update={"nprobe" if result["param"] == "nprobe" else "ef_search": result["value"]})


def needs_calibration(index: IndexConfig, index_dir: Path) -> bool:
    return open_search_param(Path(index_dir) / "faiss", index) is not None
