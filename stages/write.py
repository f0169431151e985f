"""Write: turn the mined rows into a Hugging Face dataset in a sentence-transformers format,
with the rejects and the statistics beside it.

Pairs whose positive failed the consistency check (flagged by the sample stage) go to rejects as
`positive_inconsistent` (stage `consistency`), whatever the format. Pairs that cannot fill a
`triplet`/`n-tuple` row (fewer than K surviving negatives) go to rejects as `short_of_negatives`;
`labeled-*` formats keep what they have. The accounting
identity `input pairs = output pairs + rejected pairs` is checked before anything is written.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg import schemas
from hardneg.stages.base import GlobalStage
from hardneg.stages.io import ShardWriter, count_rows, iter_batches, read_table

METADATA = ["pair_id", "query_id", "positive_id", "positive_score", "positive_ce_score"]
NEGATIVE_METADATA = [
    "negative_ids", "negative_scores", "negative_ranks", "negative_sources",
    "negative_dense_scores", "negative_dense_ranks", "negative_bm25_scores", "negative_bm25_ranks",
    "negative_ce_scores", "negative_fused_ranks",
]


from hardneg.pipeline.errors import AccountingError  # noqa: E402,F401 - re-exported


class WriteStage(GlobalStage):
    name = "write"
    version = "3"

    def __init__(self, *, format: str, num_negatives: int, metadata_columns: bool, layout: str = "disk", card: dict | None = None,
                 relabel: bool = False) -> None:
        self.relabel = relabel
        self.format = format
        self.num_negatives = num_negatives
        self.metadata_columns = metadata_columns
        self.layout = layout
        self.card = card or {}

    def fingerprint_config(self) -> dict[str, Any]:
        config = {"format": self.format, "num_negatives": self.num_negatives, "metadata_columns": self.metadata_columns, "layout": self.layout}
        if self.relabel:
            config["relabel"] = True
        return config

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
        # The decision counts scan every candidate's decision and sources (the largest columns
        # of the run) in Arrow, which releases the GIL: counted in a thread while the rows below
        # are joined, formatted and written (at 1M, about half of this stage's time).
        with ThreadPoolExecutor(1, thread_name_prefix="hardneg-write-stats") as pool:
            counted = pool.submit(_decision_counts, inputs["filtered"])
            return self._write(inputs, out_dir, counted)

    def _write(self, inputs: dict[str, Path], out_dir: Path, counted: Future) -> dict[str, Any]:
        mined = read_table(inputs["mined"], schemas.MINED).sort_by("pair_order")
        ingest_rejects = read_table(inputs["rejects"], schemas.REJECTS)
        flagged = mined.column("inconsistent").fill_null(False).to_numpy().astype(bool)
        new_rejects = [
            {"stage": "consistency", "source": "candidates", "line": None, "id": r["pair_id"], "reason": "positive_inconsistent",
             "detail": f"positive {r['positive_id']} ranks {r['positive_rank']} for its query (dense score "
                       f"{'-' if r['positive_dense_score'] is None else format(r['positive_dense_score'], '.4f')})",
             "pair": True}
            for r in mined.filter(pa.array(flagged)).select(["pair_id", "positive_id", "positive_rank", "positive_dense_score"]).to_pylist()
        ]
        mined = mined.filter(pa.array(~flagged))
        mined = _join_texts(mined, inputs["corpus"])
        counts = mined.column("negative_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        full = counts >= self.num_negatives
        if self.format in ("triplet", "n-tuple"):
            short = mined.filter(pa.array(~full))
            new_rejects += [
                {"stage": "sample", "source": "candidates", "line": None, "id": pid, "reason": "short_of_negatives",
                 "detail": f"{c} of {self.num_negatives} negatives survived the filters", "pair": True}
                for pid, c in zip(short.column("pair_id").to_pylist(), counts[~full])
            ]
            mined = mined.filter(pa.array(full))
        rejects = pa.concat_tables([ingest_rejects, pa.Table.from_pylist(new_rejects, schema=schemas.REJECTS)])
        stats = self._stats(mined, inputs, rejects, int((~full).sum()), *counted.result())
        stats["pairs_inconsistent"] = int(flagged.sum())
        stats["extra_positives"] = int(pc.sum(pc.list_value_length(mined.column("extra_positive_ids")).fill_null(0)).as_py() or 0)
        table = to_format(mined, self.format, self.num_negatives, self.metadata_columns, relabel=self.relabel)
        write_dataset(table, out_dir, self.layout)
        with ShardWriter(out_dir / "rejects", schemas.REJECTS, prefix="rejects", parquet=True) as writer:
            writer.write(rejects)
        stats["output_rows"] = table.num_rows
        return stats

    def _stats(self, mined: pa.Table, inputs: dict[str, Path], rejects: pa.Table, short: int,
               decisions: dict[str, int], per_source: dict[str, dict[str, int]]) -> dict[str, Any]:
        ingest_pair_rejects = sum(_pair_rejects(read_table(inputs["rejects"], schemas.REJECTS)).values())
        pairs_in = count_rows(inputs["pairs"]) + ingest_pair_rejects
        pair_rejects = _pair_rejects(rejects)
        pairs_out = mined.num_rows
        if pairs_in != pairs_out + sum(pair_rejects.values()):
            raise AccountingError(f"{pairs_in} input pairs != {pairs_out} written + {sum(pair_rejects.values())} rejected")
        sources, counts, _ = _first_seen(pc.list_flatten(pc.list_flatten(mined.column("negative_sources"))))
        negatives_per_source = {source: int(n) for source, n in zip(sources, counts)}
        return {
            "input_pairs": pairs_in,
            "output_pairs": pairs_out,
            "rejected_pairs": pair_rejects,
            "rejects": _by_reason(rejects),
            "pairs_short_of_negatives": short,
            "candidates": sum(decisions.values()),
            "decisions": dict(sorted(decisions.items())),
            "decisions_per_source": per_source,
            "negatives_per_source": negatives_per_source,
            "scores": {
                "positive": describe(mined.column("positive_score").to_numpy(zero_copy_only=False)),
                "negative": describe(pc.list_flatten(mined.column("negative_scores")).to_numpy(zero_copy_only=False)),
            },
            "scores_per_source": _scores_per_source(mined),
        }


def _by_reason(rejects: pa.Table) -> dict[str, int]:
    values, counts = np.unique(np.array(rejects.column("reason").to_pylist(), dtype=object).astype(str), return_counts=True) if rejects.num_rows else ([], [])
    return {str(v): int(c) for v, c in zip(values, counts)}


def _pair_rejects(rejects: pa.Table) -> dict[str, int]:
    return _by_reason(rejects.filter(rejects.column("pair")))


def _first_seen(values: pa.Array | pa.ChunkedArray) -> tuple[list, np.ndarray, np.ndarray]:
    """(distinct values, their counts, each element's index into them), the distinct values in
    order of first appearance (a Python dict's insertion order). Arrow's dictionary encoding
    numbers the distinct values of one array in that order: no sort."""
    encoded = pc.dictionary_encode(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
    codes = encoded.indices.to_numpy().astype(np.int64)
    return encoded.dictionary.to_pylist(), np.bincount(codes, minlength=len(encoded.dictionary)), codes


def _decision_counts(filtered: Path) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Every candidate's filter decision counted, overall and per source."""
    decisions: dict[str, int] = {}
    per_source: dict[str, dict[str, int]] = {}
    for batch in iter_batches(filtered, 65_536, columns=["decisions", "sources"], whole=True):
        _count_decisions(batch, decisions, per_source)
    return decisions, per_source


def _count_decisions(batch: pa.Table, decisions: dict[str, int], per_source: dict[str, dict[str, int]]) -> None:
    """Add one batch of candidates to the decision counts, overall and per source (each source's
    buckets created in order of first appearance, as the per-candidate loop did)."""
    names, counts, codes = _first_seen(pc.list_flatten(batch.column("decisions")))
    for decision, n in zip(names, counts):
        decisions[decision] = decisions.get(decision, 0) + int(n)
    sources = pc.list_flatten(batch.column("sources"))  # one list per candidate
    entries = pc.list_flatten(sources)
    if not len(entries):
        return
    owner = pc.list_parent_indices(sources).to_numpy().astype(np.int64)
    source_names, _, source_codes = _first_seen(entries)
    keys, counts, _ = _first_seen(pa.array(source_codes * len(names) + codes[owner]))
    for key, count in zip(keys, counts):
        source, decision = source_names[key // len(names)], names[key % len(names)]
        bucket = per_source.setdefault(source, {})
        bucket[decision] = bucket.get(decision, 0) + int(count)


def describe(values: np.ndarray) -> dict[str, float | int]:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        values = values.astype(np.float64)  # no None in a float array: the same values as below
    else:
        values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"count": 0}
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {"count": int(len(values)), "mean": float(values.mean()), "std": float(values.std()), "min": float(q[0]),
            "25%": float(q[1]), "50%": float(q[2]), "75%": float(q[3]), "max": float(q[4])}


def _scores_per_source(mined: pa.Table) -> dict[str, dict]:
    """Each source's negative scores (a negative counts for each source that found it), in the
    order the per-row loop met them, described."""
    scores, sources = mined.column("negative_scores"), mined.column("negative_sources")
    both = pc.and_(scores.is_valid(), sources.is_valid())
    scores, sources = scores.filter(both).combine_chunks(), sources.filter(both).combine_chunks()
    per_negative = pc.list_flatten(sources)
    entries = pc.list_flatten(per_negative)
    if not len(entries):
        return {}
    values = pc.list_flatten(scores).cast(pa.float64()).to_numpy(zero_copy_only=False)[
        pc.list_parent_indices(per_negative).to_numpy().astype(np.int64)]
    names, _, codes = _first_seen(entries)
    return {source: describe(values[codes == i]) for i, source in enumerate(names)}


def _join_texts(mined: pa.Table, corpus_dir: Path) -> pa.Table:
    """Fill in positive and negative texts, scanning the corpus once for just the needed ids
    (an Arrow filter per corpus batch, then lookups by index)."""
    needed = pc.unique(pa.chunked_array(
        [mined.column("positive_id").combine_chunks()]
        + [pc.list_flatten(mined.column(c)).combine_chunks() for c in ("negative_ids", "extra_positive_ids")], pa.string()))
    found = [b.filter(pc.is_in(b.column("doc_id"), value_set=needed))
             for b in iter_batches(corpus_dir, 100_000, columns=["doc_id", "text"], whole=True)]
    found = pa.concat_tables(found).combine_chunks() if found else pa.table({"doc_id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    ids, texts = found.column("doc_id").combine_chunks(), found.column("text").combine_chunks()

    def lookup(values: pa.Array) -> pa.Array:
        at = pc.index_in(values, value_set=ids)
        if at.null_count:
            raise KeyError(values[int(np.flatnonzero(at.is_null().to_numpy(zero_copy_only=False))[0])].as_py())
        return texts.take(at)

    def lists(column: str) -> pa.Array:
        array = mined.column(column).combine_chunks()
        counts = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.zeros(len(counts) + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), lookup(pc.list_flatten(array)).cast(pa.string()))

    mined = mined.set_column(mined.schema.get_field_index("positive"), "positive", lookup(mined.column("positive_id").combine_chunks()))
    mined = mined.set_column(mined.schema.get_field_index("extra_positives"), "extra_positives", lists("extra_positive_ids"))
    return mined.set_column(mined.schema.get_field_index("negatives"), "negatives", lists("negative_ids"))


def to_format(mined: pa.Table, format: str, k: int, metadata: bool, relabel: bool = False) -> pa.Table:
    """The rows in a sentence-transformers format. With `relabel`, a pair's extra positives are
    `extra_positives` (texts) and `extra_positive_ids` columns in n-tuple and triplet rows, label-1
    rows right after the pair's positive in labeled-pair, and label-1 passages right after it in
    labeled-list; they are never negatives."""
    if format in ("n-tuple", "triplet") and mined.num_rows:
        return _columnar_format(mined, format, k, metadata, relabel)
    return rows_format(mined, format, k, metadata, relabel)


def rows_format(mined: pa.Table, format: str, k: int, metadata: bool, relabel: bool = False) -> pa.Table:
    """`to_format` built row by row from Python dicts: the labeled-* formats, and the reference
    the columnar n-tuple and triplet builders are tested against."""
    rows = mined.to_pylist()
    for r in rows:
        r["extra_positive_ids"] = list(r.get("extra_positive_ids") or []) if relabel else []
        r["extra_positives"] = list(r.get("extra_positives") or []) if relabel else []
    meta = METADATA if metadata else []
    extra_columns = ["extra_positives", "extra_positive_ids"] if relabel else []
    if format == "n-tuple":
        out = [
            {"query": r["query"], "positive": r["positive"], **{f"negative_{i + 1}": r["negatives"][i] for i in range(k)},
             **{m: r[m] for m in extra_columns},
             **{m: r[m] for m in meta}, **({m: r[m][:k] for m in NEGATIVE_METADATA if r[m] is not None} if metadata else {})}
            for r in rows
        ]
        columns = ["query", "positive", *[f"negative_{i + 1}" for i in range(k)]] + extra_columns + (meta + NEGATIVE_METADATA if metadata else [])
    elif format == "triplet":
        out = []
        for r in rows:
            for i in range(k):
                row = {"query": r["query"], "positive": r["positive"], "negative": r["negatives"][i], **{m: r[m] for m in extra_columns}}
                if metadata:
                    row.update({m: r[m] for m in meta})
                    row.update({m[:-1] if m.endswith("s") else m: (r[m][i] if r[m] is not None else None) for m in NEGATIVE_METADATA})
                out.append(row)
        columns = None
    elif format == "labeled-pair":
        out = []
        for r in rows:
            base = {"query_id": r["query_id"], "pair_id": r["pair_id"]} if metadata else {}
            out.append({"query": r["query"], "passage": r["positive"], "label": 1, **base,
                        **({"passage_id": r["positive_id"], "score": r["positive_score"], "rank": None, "sources": None} if metadata else {})})
            for doc_id, text in zip(r["extra_positive_ids"], r["extra_positives"]):
                out.append({"query": r["query"], "passage": text, "label": 1, **base,
                            **({"passage_id": doc_id, "score": None, "rank": None, "sources": None} if metadata else {})})
            for i, text in enumerate(r["negatives"]):
                out.append({"query": r["query"], "passage": text, "label": 0, **base,
                            **({"passage_id": r["negative_ids"][i], "score": r["negative_scores"][i], "rank": r["negative_ranks"][i],
                                "sources": r["negative_sources"][i]} if metadata else {})})
        columns = None
    elif format == "labeled-list":
        out = [
            {"query": r["query"], "passages": [r["positive"], *r["extra_positives"], *r["negatives"]],
             "labels": [1] * (1 + len(r["extra_positives"])) + [0] * len(r["negatives"]),
             **({m: r[m] for m in meta} | {m: r[m] for m in NEGATIVE_METADATA} | ({"extra_positive_ids": r["extra_positive_ids"]} if relabel else {})
                if metadata else {})}
            for r in rows
        ]
        columns = None
    else:
        raise ValueError(f"unknown format {format!r}")
    table = pa.Table.from_pylist(out)
    if not out:
        names = columns or ["query", "positive"]
        table = pa.table({n: pa.array([], type=pa.string()) for n in names})
    return table


def _inferred(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The array with the type pa.Table.from_pylist infers from its Python values (what the
    row-by-row writer produced): double for floats, int64 for integers, null where every value
    is null, recursively through lists."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.null_count == len(array):
        return pa.nulls(len(array))
    kind = array.type
    if pa.types.is_list(kind):
        mask = array.is_null() if array.null_count else None
        return pa.ListArray.from_arrays(array.offsets, _inferred(array.values), mask=mask)
    if pa.types.is_floating(kind):
        return array.cast(pa.float64())
    if pa.types.is_integer(kind):
        return array.cast(pa.int64())
    return array


def _element_per_row(values: pa.Array, at: pa.Array, position: np.ndarray) -> pa.Array:
    """values[at[j]][position[j]] for each output row j; null where that list is null."""
    if values.null_count == len(values) or not len(values.values):
        return pa.nulls(len(position))
    index = values.offsets.to_numpy()[:-1][at.to_numpy()] + position
    element = values.values.take(pa.array(np.minimum(index, len(values.values) - 1)))
    return pc.if_else(values.is_valid().take(at), element, pa.nulls(len(element), element.type))


def _columnar_format(mined: pa.Table, format: str, k: int, metadata: bool, relabel: bool) -> pa.Table:
    """n-tuple and triplet rows from whole columns: the same columns, order and inferred types
    as the row-by-row construction (whose columns are its first row's keys)."""
    n = mined.num_rows
    empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    extras = {m: (pc.if_else(mined.column(m).is_null(), empty, mined.column(m)) if relabel else empty)
              for m in ("extra_positives", "extra_positive_ids")}
    extra_columns = ["extra_positives", "extra_positive_ids"] if relabel else []
    negatives = mined.column("negatives").combine_chunks()
    if format == "n-tuple":
        columns = {"query": mined.column("query"), "positive": mined.column("positive"),
                   **{f"negative_{i + 1}": pc.list_element(negatives, i) for i in range(k)},
                   **{m: extras[m] for m in extra_columns}}
        if metadata:
            columns.update({m: mined.column(m) for m in METADATA})
            first = mined.slice(0, 1)
            columns.update({m: pc.list_slice(mined.column(m).combine_chunks(), 0, k) for m in NEGATIVE_METADATA
                            if first.column(m).is_valid()[0].as_py()})
        return pa.table({name: _inferred(column) for name, column in columns.items()})
    at = pa.array(np.repeat(np.arange(n), k))  # triplet: k rows per pair, negatives in order
    position = np.tile(np.arange(k), n)
    flat_at = pa.array(negatives.offsets.to_numpy()[:-1].repeat(k) + position)
    columns = {"query": mined.column("query").take(at), "positive": mined.column("positive").take(at),
               "negative": negatives.values.take(flat_at), **{m: extras[m].take(at) for m in extra_columns}}
    if metadata:
        columns.update({m: mined.column(m).take(at) for m in METADATA})
        for m in NEGATIVE_METADATA:
            columns[m[:-1] if m.endswith("s") else m] = _element_per_row(mined.column(m).combine_chunks(), at, position)
    return pa.table({name: _inferred(column) for name, column in columns.items()})


def write_dataset(table: pa.Table, out_dir: Path, layout: str) -> None:
    import datasets

    dataset = datasets.Dataset(table)
    if layout == "hub":
        (out_dir / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(out_dir / "data" / "train-00000-of-00001.parquet"))
    else:
        # One shard at least: an empty dataset must still load.
        dataset.save_to_disk(str(out_dir), num_shards=max(1, min(64, table.num_rows // 100_000 + 1)))
