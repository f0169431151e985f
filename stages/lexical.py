"""The lexical stage: every candidate's BM25 score with its query's positive as the BM25 query.

The `lexical_duplicate` filter drops the candidates that are lexical near-duplicates of the
positive; its scores depend on the candidates and the BM25 index only, never on a filter's
settings. Scored here, in their own cached stage, a run that only changes a filter reads them
instead of scoring every (positive, candidate) pair again (on Cranfield that scoring and loading
the BM25 index were most of a re-run's filter stage).

Adds `positive_lexical_scores` (one value per candidate, null where no positive has a text) to
the rows it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg.stages.base import MapStage, Resources
from hardneg.stages.filters import LEXICAL_COLUMN, _list_column
from hardneg.stages.io import DocIds, lists_like


class PositiveLexicon:
    """BM25 scores of a query's candidates with each of its positives' texts as the BM25 query
    (the highest over its positives): the run's BM25 index, and the texts of the positives only,
    read in one scan of the corpus (an Arrow filter per corpus batch, no Python object per
    document)."""

    def __init__(self, bm25_dir: Path, bm25_config, corpus_dir: Path, positive_ids) -> None:
        from hardneg.stages.engines.bm25 import BM25Index
        from hardneg.stages.io import iter_batches

        self.index = BM25Index.load(Path(bm25_dir), bm25_config)
        wanted = positive_ids if isinstance(positive_ids, (pa.Array, pa.ChunkedArray)) else pa.array(sorted(positive_ids), pa.string())
        found = [batch.filter(pc.is_in(batch.column("doc_id"), value_set=wanted))
                 for batch in iter_batches(Path(corpus_dir), 100_000, columns=["doc_id", "text"], whole=True)]
        table = pa.concat_tables(found) if found else pa.table({"doc_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
        self._ids = table.column("doc_id").combine_chunks()
        self._texts = table.column("text").combine_chunks()
        self._rows = DocIds(self._ids)  # id -> position in _texts (ingest wrote each id once)
        # Each positive's query terms, tokenised once here rather than again in every batch.
        self._tokens = self.index.prepare(self._texts.to_pylist()) if len(self._texts) else []

    @property
    def texts(self) -> dict[str, str]:
        return dict(zip(self._ids.to_pylist(), self._texts.to_pylist()))

    def scores(self, row: dict[str, Any]) -> list[float]:
        """One row's scores (None where no positive has a text): the reference for batch_scores."""
        texts = self.texts
        candidates = list(row["candidate_ids"])
        best = np.full(len(candidates), -np.inf)
        for positive in row["positive_ids"]:
            if positive in texts and candidates:
                best = np.maximum(best, np.asarray(self.index.score(texts[positive], candidates), dtype=np.float64))
        return [None if np.isinf(v) else float(v) for v in best]

    def batch_scores(self, batch: pa.Table) -> np.ndarray:
        """`scores` for every candidate of a batch, flat (NaN for None): every (positive,
        candidate) pair of a query scored in one sparse gather (`BM25Index.score_rows`)."""
        ids = _list_column(batch, "candidate_ids")
        counts = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.cumsum(counts) - counts
        positives = _list_column(batch, "positive_ids")
        pos_group = pc.list_parent_indices(positives).to_numpy().astype(np.int64)
        # A binary search of the sorted ids: `index_in` hashed every positive id again per batch.
        at = self._rows.rows(pc.list_flatten(positives))
        has = at >= 0
        at, pos_group = at[has], pos_group[has]
        best = np.full(int(counts.sum()), -np.inf)
        per_positive = counts[pos_group]
        if len(best) and per_positive.sum():
            tokens = [self._tokens[i] for i in at.tolist()]
            pair_positive = np.repeat(np.arange(len(at), dtype=np.int64), per_positive)
            pair_candidate = np.repeat(starts[pos_group] - np.cumsum(per_positive) + per_positive, per_positive) \
                + np.arange(int(per_positive.sum()))
            rows = self.index.rows_of(pc.list_flatten(ids))
            if (rows < 0).any():
                raise KeyError(f"doc id {pc.list_flatten(ids)[int(np.flatnonzero(rows < 0)[0])]!r} is not in the index")
            scores = self.index.score_rows(tokens, pair_positive, rows[pair_candidate])
            np.maximum.at(best, pair_candidate, scores)
        return np.where(np.isinf(best), np.nan, best)


class LexicalStage(MapStage):
    name = "lexical"
    version = "1"
    stateful = True  # holds the BM25 index and the positives' texts

    def __init__(self, *, bm25_dir: Path, bm25_config, corpus_dir: Path, rows_dir: Path, batch_size: int = 1024,
                 max_workers: int | None = None, threads: int = 1) -> None:
        super().__init__()
        self.bm25_dir = str(bm25_dir)
        self.bm25_config = bm25_config
        self.corpus_dir = str(corpus_dir)
        self.rows_dir = str(rows_dir)  # the rows it scores: their positives' texts are loaded once
        self.resources = Resources(num_cpus=1, batch_size=batch_size, max_workers=max_workers)
        # In-process, `threads` batches side by side: the scoring kernel and Arrow release the GIL.
        self.local_batches = max(1, int(threads))

    def fingerprint_config(self) -> dict[str, Any]:
        return {}  # a function of its inputs alone (the BM25 index's fingerprint holds its settings)

    def setup(self) -> None:
        from hardneg.stages.io import iter_batches

        parts = [pc.list_flatten(batch.column("positive_ids").combine_chunks())
                 for batch in iter_batches(Path(self.rows_dir), 65_536, columns=["positive_ids"], whole=True)]
        positives = pc.unique(pa.chunked_array(parts, pa.string())) if parts else pa.array([], pa.string())
        self._lexicon = PositiveLexicon(Path(self.bm25_dir), self.bm25_config, Path(self.corpus_dir), positives)

    def transform(self, batch: pa.Table) -> pa.Table:
        scores = self._lexicon.batch_scores(batch)  # NaN where no positive has a text: null
        return batch.append_column(LEXICAL_COLUMN, lists_like(_list_column(batch, "candidate_ids"), scores, pa.float64()))
