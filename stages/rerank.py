"""Rerank: score each query's positives and its surviving candidates with a cross-encoder.

Only candidates that pass the cheap filters (every filter that does not read the cross-encoder
score) are scored: the expensive model never sees what the filters already dropped. Pairs are
scored across queries in one pool, sorted by length so batches carry little padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hardneg.stages.base import MapStage, Resources
from hardneg.stages.filters import KEPT, decide
from hardneg.stages.io import iter_batches
from hardneg.stages.models import model_fingerprint, resolve_model


class RerankStage(MapStage):
    name = "rerank"
    version = "1"
    stateful = True

    def __init__(self, *, model: str, specs: list[dict[str, Any]], corpus_dir: Path, batch_size: int = 32,
                 max_length: int | None = None, device: str = "cpu", threads: int = 1,
                 trust_remote_code: bool = False, max_workers: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.specs = specs
        self.corpus_dir = str(corpus_dir)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.threads = threads
        self.trust_remote_code = trust_remote_code
        self.resources = Resources(num_cpus=threads, num_gpus=1.0 if device.startswith("cuda") else 0.0,
                                   batch_size=256, max_workers=max_workers)

    def fingerprint_config(self) -> dict[str, Any]:
        cheap = [s for s in self.specs if s.get("score") != "cross_encoder"]
        return {**model_fingerprint(self.model), "cheap_filters": cheap, "max_length": self.max_length}

    def setup(self) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        if not self.device.startswith("cuda"):
            torch.set_num_threads(max(1, int(self.threads)))
        self._model = CrossEncoder(resolve_model(self.model), device=self.device, max_length=self.max_length,
                                   trust_remote_code=self.trust_remote_code)
        # Documents are looked up by id; the corpus is read once per worker.
        self._texts: dict[str, str] = {}
        for batch in iter_batches(Path(self.corpus_dir), 100_000):
            self._texts.update(zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()))

    def score_pairs(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        # Longest first, so each batch holds texts of similar length.
        order = sorted(range(len(pairs)), key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]), i))
        scores = self._model.predict([pairs[i] for i in order], batch_size=self.batch_size,
                                     show_progress_bar=False, convert_to_numpy=True)
        out = np.empty(len(pairs), dtype=np.float32)
        out[order] = np.asarray(scores, dtype=np.float32).reshape(len(pairs), -1)[:, 0]
        return out

    def transform(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        pairs: list[tuple[str, str]] = []
        slots: list[tuple[int, str, int]] = []  # (row, "pos" | "cand", index)
        for r, row in enumerate(rows):
            for j, doc_id in enumerate(row["positive_ids"]):
                pairs.append((row["text"], self._texts[doc_id]))
                slots.append((r, "pos", j))
            decisions = decide({**row, "ce_scores": None, "positive_ce_scores": None}, self.specs, skip_score="cross_encoder")
            for j, decision in enumerate(decisions):
                if decision == KEPT:
                    pairs.append((row["text"], self._texts[row["candidate_ids"][j]]))
                    slots.append((r, "cand", j))
        scores = self.score_pairs(pairs)
        positive = [[None] * len(row["positive_ids"]) for row in rows]
        candidate = [[None] * len(row["candidate_ids"]) for row in rows]
        for (r, kind, j), score in zip(slots, scores):
            (positive if kind == "pos" else candidate)[r][j] = float(score)
        batch = batch.append_column("positive_ce_scores", pa.array(positive, type=pa.list_(pa.float32())))
        return batch.append_column("ce_scores", pa.array(candidate, type=pa.list_(pa.float32())))
