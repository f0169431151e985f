"""Write: turn the mined rows into a Hugging Face dataset in a sentence-transformers format,
with the rejects and the statistics beside it.

Pairs whose positive failed the consistency check (flagged by the sample stage) go to rejects as
`positive_inconsistent` (stage `consistency`), whatever the format. Pairs that cannot fill a
`triplet`/`n-tuple` row (fewer than K surviving negatives) go to rejects as `short_of_negatives`;
`labeled-*` formats keep what they have. The accounting
identity `input pairs = output pairs + rejected pairs` is checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg import schemas
from hardneg.stages.base import GlobalStage
from hardneg.stages.filters import KEPT
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
        mined = read_table(inputs["mined"], schemas.MINED).sort_by("pair_order")
        ingest_rejects = read_table(inputs["rejects"], schemas.REJECTS)
        flagged = np.asarray(mined.column("inconsistent").fill_null(False).to_pylist(), dtype=bool)
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
        stats = self._stats(mined, inputs, rejects, int((~full).sum()))
        stats["pairs_inconsistent"] = int(flagged.sum())
        stats["extra_positives"] = int(sum(len(ids or []) for ids in mined.column("extra_positive_ids").to_pylist()))
        table = to_format(mined, self.format, self.num_negatives, self.metadata_columns, relabel=self.relabel)
        write_dataset(table, out_dir, self.layout)
        with ShardWriter(out_dir / "rejects", schemas.REJECTS, prefix="rejects") as writer:
            writer.write(rejects)
        stats["output_rows"] = table.num_rows
        return stats

    def _stats(self, mined: pa.Table, inputs: dict[str, Path], rejects: pa.Table, short: int) -> dict[str, Any]:
        ingest_pair_rejects = sum(_pair_rejects(read_table(inputs["rejects"], schemas.REJECTS)).values())
        pairs_in = count_rows(inputs["pairs"]) + ingest_pair_rejects
        pair_rejects = _pair_rejects(rejects)
        pairs_out = mined.num_rows
        if pairs_in != pairs_out + sum(pair_rejects.values()):
            raise AccountingError(f"{pairs_in} input pairs != {pairs_out} written + {sum(pair_rejects.values())} rejected")
        decisions: dict[str, int] = {}
        per_source: dict[str, dict[str, int]] = {}
        for batch in iter_batches(inputs["filtered"], 4096, columns=["decisions", "sources"]):
            for row_decisions, row_sources in zip(batch.column("decisions").to_pylist(), batch.column("sources").to_pylist()):
                for decision, sources in zip(row_decisions, row_sources):
                    decisions[decision] = decisions.get(decision, 0) + 1
                    for source in sources:
                        bucket = per_source.setdefault(source, {})
                        bucket[decision] = bucket.get(decision, 0) + 1
        negatives_per_source: dict[str, int] = {}
        for sources in mined.column("negative_sources").to_pylist():
            for negative in sources or []:
                for source in negative:
                    negatives_per_source[source] = negatives_per_source.get(source, 0) + 1
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


def describe(values: np.ndarray) -> dict[str, float | int]:
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"count": 0}
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {"count": int(len(values)), "mean": float(values.mean()), "std": float(values.std()), "min": float(q[0]),
            "25%": float(q[1]), "50%": float(q[2]), "75%": float(q[3]), "max": float(q[4])}


def _scores_per_source(mined: pa.Table) -> dict[str, dict]:
    out: dict[str, list[float]] = {}
    for scores, sources in zip(mined.column("negative_scores").to_pylist(), mined.column("negative_sources").to_pylist()):
        for score, negative_sources in zip(scores or [], sources or []):
            for source in negative_sources:
                out.setdefault(source, []).append(score)
    return {source: describe(np.array(values, dtype=np.float64)) for source, values in out.items()}


def _join_texts(mined: pa.Table, corpus_dir: Path) -> pa.Table:
    """Fill in positive and negative texts, scanning the corpus once for just the needed ids."""
    needed = set(mined.column("positive_id").to_pylist())
    for column in ("negative_ids", "extra_positive_ids"):
        for ids in mined.column(column).to_pylist():
            needed.update(ids or [])
    texts: dict[str, str] = {}
    for batch in iter_batches(corpus_dir, 100_000):
        for doc_id, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()):
            if doc_id in needed:
                texts[doc_id] = text
    positives = pa.array([texts[d] for d in mined.column("positive_id").to_pylist()], type=pa.string())
    negatives = pa.array([[texts[d] for d in ids or []] for ids in mined.column("negative_ids").to_pylist()], type=pa.list_(pa.string()))
    extras = pa.array([[texts[d] for d in ids or []] for ids in mined.column("extra_positive_ids").to_pylist()], type=pa.list_(pa.string()))
    mined = mined.set_column(mined.schema.get_field_index("positive"), "positive", positives)
    mined = mined.set_column(mined.schema.get_field_index("extra_positives"), "extra_positives", extras)
    return mined.set_column(mined.schema.get_field_index("negatives"), "negatives", negatives)


def to_format(mined: pa.Table, format: str, k: int, metadata: bool, relabel: bool = False) -> pa.Table:
    """The rows in a sentence-transformers format. With `relabel`, a pair's extra positives are
    `extra_positives` (texts) and `extra_positive_ids` columns in n-tuple and triplet rows, label-1
    rows right after the pair's positive in labeled-pair, and label-1 passages right after it in
    labeled-list; they are never negatives."""
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


def write_dataset(table: pa.Table, out_dir: Path, layout: str) -> None:
    import datasets

    dataset = datasets.Dataset(table)
    if layout == "hub":
        (out_dir / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(out_dir / "data" / "train-00000-of-00001.parquet"))
    else:
        # One shard at least: an empty dataset must still load.
        dataset.save_to_disk(str(out_dir), num_shards=max(1, min(64, table.num_rows // 100_000 + 1)))
