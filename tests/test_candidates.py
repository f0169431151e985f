"""The candidates stage's per-query columns (stages/candidates.py) against brute force."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hardneg import schemas
from hardneg.stages.io import ShardWriter


# ---------------------------------------------------------------------------- candidates' columns
@pytest.mark.parametrize("exact_threshold", [10_000, 0])
def test_candidates_positive_ranks_and_similarity(tmp_path, exact_threshold):
    """positive_ranks (1 + documents scoring higher, over the whole corpus) and
    positive_similarity (highest cosine to a positive) against brute force; with the exact scan
    (small corpus) and, above index.exact_threshold, from the search: exact within its depth,
    depth + 1 beyond."""
    from hardneg.stages.engines.faiss_index import IndexConfig
    from hardneg.stages.candidates import CandidatesStage
    from hardneg.stages.index import IndexStage

    rng = np.random.default_rng(5)
    n, dim = 300, 16
    docs = rng.normal(size=(n, dim))
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    ids = [f"d{i:03d}" for i in range(n)]
    with ShardWriter(tmp_path / "corpus", schemas.CORPUS) as w:
        w.write_rows([{"doc_id": d, "text": d} for d in ids])
    with ShardWriter(tmp_path / "emb", schemas.embeddings_schema(dim)) as w:
        w.write(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(docs.astype(np.float32).ravel()), dim)}))
    cfg = IndexConfig(index="Flat", exact_threshold=exact_threshold)
    (tmp_path / "index").mkdir()
    IndexStage(cfg).run({"corpus": tmp_path / "corpus", "embeddings": tmp_path / "emb"}, tmp_path / "index")

    queries = rng.normal(size=(4, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = docs @ queries.T.astype(np.float64)
    positives = []
    for q in range(4):
        order = np.argsort(-scores[:, q])
        positives.append([ids[order[0]], ids[order[7]], ids[order[200]]])  # ranks 1, 8, 201
    batch = pa.Table.from_pylist([
        {"query_id": f"q{q}", "text": "", "pair_ids": [f"q{q}:{p}" for p in positives[q]], "pair_order": [0, 1, 2],
         "positive_ids": positives[q], "mask_ids": positives[q], "embedding": queries[q].tolist()}
        for q in range(4)
    ])
    stage = CandidatesStage(miners=["dense"], range_max=20, rrf_k=60, index_dir=tmp_path / "index", index_config=cfg)
    out = stage(batch).to_pylist()
    depth = 20 + 3  # range_max + masked ids
    for q, row in enumerate(out):
        expected = [1 + int(np.sum(scores[:, q] > scores[ids.index(p), q])) for p in positives[q]]
        assert expected == [1, 8, 201]
        assert row["positive_ranks"] == (expected if exact_threshold else [1, 8, depth + 1])
        pos = docs[[ids.index(p) for p in positives[q]]]
        sims = (docs[[ids.index(c) for c in row["candidate_ids"]]] @ pos.T).max(axis=1)
        np.testing.assert_allclose(row["positive_similarity"], sims, atol=1e-6)
        assert len(row["candidate_ids"]) == 20 and not set(row["candidate_ids"]) & set(positives[q])
