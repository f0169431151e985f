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
import pyarrow.compute as pc

from hardneg.stages.base import MapStage, Resources
from hardneg.stages.filters import KEPT, decide_batch
from hardneg.stages.io import lists_like, read_group, shard_files, shard_groups
from hardneg.stages.models import model_fingerprint, resolve_model


class CorpusTexts:
    """Texts of the corpus (shards of doc_id, text) looked up by id a batch at a time.
    Only the ids are held (as Arrow/numpy, no Python object per document) with each one's
    (file, row group or record batch, row); a lookup reads the text column of the groups that hold the asked
    ids and keeps just those texts."""

    def __init__(self, directory: Path) -> None:
        from hardneg.stages.io import DocIds

        self._files = shard_files(directory)
        ids, where = [], []
        for f, file in enumerate(self._files):
            for g in range(shard_groups(file)):
                column = read_group(file, g, columns=["doc_id"]).column("doc_id")
                ids.append(column.combine_chunks())
                where.append(np.stack([np.full(len(column), f), np.full(len(column), g), np.arange(len(column))], 1))
        self._ids = DocIds(pa.concat_arrays(ids) if ids else pa.array([], pa.string()))
        self._where = np.concatenate(where) if where else np.zeros((0, 3), dtype=np.int64)

    def lookup(self, doc_ids: list[str]) -> dict[str, str]:
        unique = sorted(set(doc_ids))
        rows = self._ids.rows(pa.array(unique, pa.string()))
        if (rows < 0).any():
            raise KeyError(f"document {unique[int(np.flatnonzero(rows < 0)[0])]!r} is not in the corpus")
        where = self._where[rows]
        out: dict[str, str] = {}
        for f, g in sorted({(int(a), int(b)) for a, b, _ in where}):
            at = np.flatnonzero((where[:, 0] == f) & (where[:, 1] == g))
            texts = read_group(self._files[f], g, columns=["text"]).column("text").take(pa.array(where[at, 2]))
            out.update(zip((unique[i] for i in at), texts.to_pylist()))
        return out


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
        # Texts are read per batch, only those the batch scores: a worker holds the ids, not the
        # corpus (every text in a dict costs gigabytes per worker on a large corpus).
        self._texts = CorpusTexts(Path(self.corpus_dir))

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
        positives = _flat(batch, "positive_ids")
        candidates = _flat(batch, "candidate_ids")
        # The candidates every cheap filter keeps (the cross-encoder filters come after this stage).
        decisions = decide_batch(batch, self.specs, skip_score="cross_encoder")
        kept = np.flatnonzero(pc.equal(pc.list_flatten(decisions), KEPT).to_numpy(zero_copy_only=False))
        # Pairs row by row, each row's positives then its kept candidates: the order the pairs
        # were always scored in (a batch's padding follows it).
        rows = np.concatenate([positives.group, candidates.group[kept]])
        kind = np.r_[np.zeros(len(positives.group), np.int8), np.ones(len(kept), np.int8)]
        at = np.concatenate([np.arange(len(positives.group)), kept])
        order = np.lexsort((at, kind, rows))
        ids = positives.ids + [candidates.ids[i] for i in kept.tolist()]
        wanted = [ids[i] for i in order.tolist()]
        texts = self._texts.lookup(wanted)
        queries = batch.column("text").to_pylist()
        scores = np.empty(len(order), dtype=np.float64)
        scores[order] = self.score_pairs([(queries[r], texts[doc_id]) for r, doc_id in zip(rows[order].tolist(), wanted)])
        candidate = np.full(len(candidates.ids), np.nan)
        candidate[kept] = scores[len(positives.group):]
        batch = batch.append_column("positive_ce_scores", positives.lists(scores[:len(positives.group)]))
        return batch.append_column("ce_scores", candidates.lists(candidate))


class _Flat:
    """A list column of a batch, flat: each element's row and value, and lists rebuilt alike."""

    def __init__(self, column: pa.Array) -> None:
        self.column = column
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.group = np.repeat(np.arange(len(column), dtype=np.int64), lengths)
        self.ids = pc.list_flatten(column).to_pylist()

    def lists(self, values: np.ndarray) -> pa.Array:
        """float32 lists aligned with this column, null where `values` is NaN (not scored)."""
        return lists_like(self.column, values, pa.float32())


def _flat(batch: pa.Table, name: str) -> _Flat:
    column = batch.column(name)
    return _Flat(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
