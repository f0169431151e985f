"""Arrow schemas of every table that flows between hardneg's stages.

Each stage reads and writes Parquet shards with one of these schemas; `SCHEMA_VERSION` is part of
every stage fingerprint, so changing a schema invalidates cached stage outputs.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

_ids = pa.list_(pa.string())
_floats = pa.list_(pa.float32())
_ints = pa.list_(pa.int32())

# One document of the corpus. `text` is what gets embedded and indexed (title and body joined).
CORPUS = pa.schema([("doc_id", pa.string()), ("text", pa.string())])

# One query that has at least one pair, with everything mining needs to know about it:
# the positives of its pairs (aligned with pair_ids/pair_order) and every id that must never be
# sampled as one of its negatives (its judged-relevant documents, a superset of positive_ids).
QUERIES = pa.schema(
    [
        ("query_id", pa.string()),
        ("text", pa.string()),
        ("pair_ids", _ids),
        ("pair_order", pa.list_(pa.int64())),
        ("positive_ids", _ids),
        ("mask_ids", _ids),
    ]
)

# One input pair, in input order (`pair_order`), for accounting: every pair ends in the output or
# in rejects.
PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("pair_order", pa.int64()),
        ("query_id", pa.string()),
        ("positive_id", pa.string()),
    ]
)

# A text's embedding. `embedding` is a fixed-size list; its dimension is only known at run time.
def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


# Candidates of one query: the QUERIES columns plus, per candidate (aligned lists), where it came
# from and how every miner scored it. A score or rank is null where that source did not find it.
# `positive_ranks` (aligned with positive_ids): each positive's dense rank among the whole corpus
# for its query, 1 + the number of documents scoring higher. `positive_similarity` (aligned with
# candidate_ids): each candidate's highest document-document cosine to the query's positives.
# `top_similarity` (aligned with candidate_ids; null unless a pseudo_relevance filter asks): each
# candidate's highest cosine to its query's first few candidates, null for those themselves.
CANDIDATES = pa.schema(
    list(QUERIES)
    + [
        ("positive_dense_scores", _floats),
        ("positive_bm25_scores", _floats),
        ("positive_ranks", _ints),
        ("candidate_ids", _ids),
        ("sources", pa.list_(pa.list_(pa.string()))),
        ("dense_scores", _floats),
        ("dense_ranks", _ints),
        ("bm25_scores", _floats),
        ("bm25_ranks", _ints),
        ("fused_ranks", _ints),
        ("positive_similarity", _floats),
        ("top_similarity", _floats),
    ]
)

# After the optional cross-encoder stage: its scores of the positives and of the candidates that
# survived the cheap filters (null for those it did not score).
SCORED = pa.schema(
    list(CANDIDATES) + [("positive_ce_scores", _floats), ("ce_scores", _floats)]
)

# After filtering: one decision per candidate, "kept" or the name of the filter that dropped it.
FILTERED = pa.schema(list(SCORED) + [("decisions", _ids)])

# One mined row per pair (the long form every output format is made from). The negatives are in
# the order they were sampled; every per-negative list is aligned with negative_ids.
MINED = pa.schema(
    [
        ("pair_order", pa.int64()),
        ("pair_id", pa.string()),
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("positive_id", pa.string()),
        ("positive", pa.string()),
        ("positive_score", pa.float32()),
        ("positive_ce_score", pa.float32()),
        ("negative_ids", _ids),
        ("negatives", _ids),
        ("negative_scores", _floats),
        ("negative_ranks", _ints),
        ("negative_sources", pa.list_(pa.list_(pa.string()))),
        ("negative_dense_scores", _floats),
        ("negative_dense_ranks", _ints),
        ("negative_bm25_scores", _floats),
        ("negative_bm25_ranks", _ints),
        ("negative_ce_scores", _floats),
        ("negative_fused_ranks", _ints),
        # The positive consistency check (consistency_top_k / consistency_min_score): the
        # positive's dense score and corpus rank, and whether the pair fails the check (the writer
        # routes failing pairs to rejects as positive_inconsistent).
        ("positive_dense_score", pa.float32()),
        ("positive_rank", pa.int32()),
        ("inconsistent", pa.bool_()),
        # false_negatives: relabel: the candidates a filter judged relevant with high confidence,
        # made extra positives of the pair (never negatives); empty otherwise. Texts joined by the writer.
        ("extra_positive_ids", _ids),
        ("extra_positives", _ids),
    ]
)

# A row that did not make it into the output, and why. `source` is the file (or stage) it came
# from; `line` its 1-based line in that file when it has one.
REJECTS = pa.schema(
    [
        ("stage", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        # True when the rejected row was an input pair: pairs in = pairs out + pair rejects.
        ("pair", pa.bool_()),
    ]
)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
