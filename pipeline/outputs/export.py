"""Export a hardneg output folder to the training-data formats of other trainers.

`export(dataset_dir, to, out_file)` reads what `hardneg mine` wrote, in either layout:

- `disk` (the default): a `datasets.save_to_disk` folder, read with `datasets.load_from_disk`;
- `hub`: `data/*.parquet` (+ a dataset card), the files `datasets.load_dataset(folder)` reads,

in any of the four sentence-transformers formats hardneg writes (`n-tuple`, `triplet`,
`labeled-pair`, `labeled-list`), with or without the metadata columns, and writes one JSON line
per (query, positive) pair:

- `flagembedding`: FlagEmbedding's fine-tuning format,
  `{"query": str, "pos": [str], "neg": [str], "pos_scores": [float], "neg_scores": [float], "prompt": ""}`.
  `pos_scores`/`neg_scores` (the score hardneg filtered on: `positive_score`, `negative_scores`)
  are written only when the dataset has those columns; without metadata the lines carry
  `query`, `pos`, `neg` and `prompt` only.
- `tevatron`: Tevatron's training format,
  `{"query_id": str, "query": str, "positive_passages": [{"docid", "title", "text"}],
  "negative_passages": [...]}` with `title` always `""` (hardneg passages are single texts).
  Ids come from the metadata columns (`query_id`, `positive_id`, `negative_ids`, ...). Without
  them (`metadata_columns=False`) every id is a stable content hash: the first 16 hex digits of
  the SHA-1 of the UTF-8 text (the query's text for `query_id`, the passage's for `docid`), so the
  same text always gets the same id, across rows and across runs.

Pairs without a positive or without any negative (the `labeled-*` formats keep pairs whose
negatives were all filtered out) are skipped: neither trainer can build a training group from
them. The count of skipped pairs is logged. The file is written atomically (a temporary file in
the same folder, then `os.replace`), so a reader never sees half an export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardneg.pipeline.errors import ConfigError, ExportError
from hardneg.pipeline.outputs.reader import OutputFolder

log = logging.getLogger(__name__)

TARGETS = ("flagembedding", "tevatron")
_NEGATIVE_TEXT = re.compile(r"^negative_(\d+)$")
_BATCH = 1024


def export(dataset_dir: Path, to: str, out_file: Path) -> int:
    """Write the hardneg dataset in `dataset_dir` as `to`-format JSONL to `out_file`.

    Returns the number of lines written. Raises `ConfigError` (one line) for an unknown target,
    a folder that is not a hardneg output, or a dataset whose columns it cannot export.
    """
    target = str(to).strip().lower()
    if target not in TARGETS:
        raise ConfigError(f"unknown export target {to!r}: choose one of {', '.join(TARGETS)}")
    dataset_dir = Path(dataset_dir)
    out_file = Path(out_file)
    if out_file.resolve().is_relative_to(dataset_dir.resolve()):
        raise ExportError(f"--out {out_file} is inside the dataset {dataset_dir}: write the export elsewhere "
                          "(it would replace or add to the dataset's own files)")
    output = OutputFolder(dataset_dir, ConfigError)
    columns = output.columns()
    batches = lambda: output.row_batches(_BATCH)  # noqa: E731
    reader = _reader_for(columns, dataset_dir)
    # Scores: positive_score + negative_scores (n-tuple, labeled-list) or negative_score
    # (triplet); labeled-pair has one `score` per row.
    has_scores = ("positive_score" in columns and ("negative_scores" in columns or "negative_score" in columns)) or (
        "score" in columns and "label" in columns
    )
    to_line: Callable[[_Group], dict[str, Any]]
    if target == "flagembedding":
        to_line = lambda g: _flagembedding(g, has_scores)  # noqa: E731
    else:
        to_line = _tevatron

    written = skipped = 0
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.parent / f".{out_file.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for group in reader(_rows(batches)):
                if not group.positives or not group.negatives:
                    skipped += 1
                    continue
                handle.write(json.dumps(to_line(group), ensure_ascii=False) + "\n")
                written += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if skipped:
        log.warning("export: skipped %d pair(s) without a positive or without negatives", skipped)
    return written


# --- reading ------------------------------------------------------------------------------------


def _rows(batches: Callable[[], Iterator[list[dict[str, Any]]]]) -> Iterator[dict[str, Any]]:
    for batch in batches():
        yield from batch


# --- the four formats, as groups of one query, its positive(s) and negatives -----------------------


@dataclass
class _Passage:
    text: str
    id: str | None = None
    score: float | None = None


@dataclass
class _Group:
    query: str
    query_id: str | None = None
    positives: list[_Passage] = field(default_factory=list)
    negatives: list[_Passage] = field(default_factory=list)


Reader = Callable[[Iterable[dict[str, Any]]], Iterator[_Group]]


def _reader_for(columns: list[str], folder: Path) -> Reader:
    cols = set(columns)
    if {"query", "passages", "labels"} <= cols:
        return _labeled_list
    if {"query", "positive"} <= cols and any(_NEGATIVE_TEXT.match(c) for c in cols):
        order = sorted((c for c in cols if _NEGATIVE_TEXT.match(c)), key=lambda c: int(c.split("_")[1]))
        return lambda rows: _n_tuple(rows, order)
    if {"query", "positive", "negative"} <= cols:
        return _triplet
    if {"query", "passage", "label"} <= cols:
        return _labeled_pair
    if cols == {"query", "positive"}:
        # What the writer leaves when no pair survived: an empty table with just these columns.
        return _empty_or_pairs
    raise ConfigError(
        f"not a hardneg output: {folder} has columns {sorted(cols)}; expected the n-tuple, triplet, "
        "labeled-pair or labeled-list columns"
    )


def _empty_or_pairs(rows: Iterable[dict[str, Any]]) -> Iterator[_Group]:
    if next(iter(rows), None) is not None:
        raise ConfigError("cannot export: the dataset has query/positive pairs but no negatives")
    return iter(())


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _at(values: list | None, i: int) -> Any:
    return values[i] if values is not None and i < len(values) else None


def _n_tuple(rows: Iterable[dict[str, Any]], negative_columns: list[str]) -> Iterator[_Group]:
    for r in rows:
        ids, scores = r.get("negative_ids"), r.get("negative_scores")
        yield _Group(
            query=r["query"],
            query_id=r.get("query_id"),
            positives=[_Passage(r["positive"], r.get("positive_id"), _float(r.get("positive_score")))],
            negatives=[
                _Passage(r[c], _at(ids, i), _float(_at(scores, i)))
                for i, c in enumerate(negative_columns)
                if r[c] is not None
            ],
        )


def _labeled_list(rows: Iterable[dict[str, Any]]) -> Iterator[_Group]:
    for r in rows:
        passages, labels = r["passages"] or [], r["labels"] or []
        # The writer puts the positive first: [positive, *negatives], aligned with
        # [positive_id, *negative_ids] and [positive_score, *negative_scores].
        ids = [r.get("positive_id"), *(r.get("negative_ids") or [])] if "negative_ids" in r else None
        scores = [r.get("positive_score"), *(r.get("negative_scores") or [])] if "negative_scores" in r else None
        if ids is not None and len(ids) != len(passages):
            ids = None
        if scores is not None and len(scores) != len(passages):
            scores = None
        group = _Group(query=r["query"], query_id=r.get("query_id"))
        for i, (text, label) in enumerate(zip(passages, labels)):
            passage = _Passage(text, _at(ids, i), _float(_at(scores, i)))
            (group.positives if label else group.negatives).append(passage)
        yield group


def _triplet(rows: Iterable[dict[str, Any]]) -> Iterator[_Group]:
    """Rows of one pair share a key: pair_id, else (query_id, positive_id), else the texts."""
    groups: dict[Any, _Group] = {}
    for r in rows:
        if r.get("pair_id") is not None:
            key: Any = r["pair_id"]
        elif r.get("query_id") is not None and r.get("positive_id") is not None:
            key = (r["query_id"], r["positive_id"])
        else:
            key = (r["query"], r["positive"])
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(
                query=r["query"],
                query_id=r.get("query_id"),
                positives=[_Passage(r["positive"], r.get("positive_id"), _float(r.get("positive_score")))],
            )
        group.negatives.append(_Passage(r["negative"], r.get("negative_id"), _float(r.get("negative_score"))))
    yield from groups.values()


def _labeled_pair(rows: Iterable[dict[str, Any]]) -> Iterator[_Group]:
    """With metadata, rows of one pair share its pair_id. Without it, the writer's order decides:
    each pair is its positive (label 1) followed by its negatives (label 0)."""
    groups: dict[Any, _Group] = {}
    current: _Group | None = None
    serial = 0
    for r in rows:
        passage = _Passage(r["passage"], r.get("passage_id"), _float(r.get("score")))
        if r.get("pair_id") is not None:
            group = groups.get(r["pair_id"])
            if group is None:
                group = groups[r["pair_id"]] = _Group(query=r["query"], query_id=r.get("query_id"))
        else:
            if current is None or r["label"] or current.query != r["query"]:
                serial += 1
                current = groups[("serial", serial)] = _Group(query=r["query"], query_id=r.get("query_id"))
            group = current
        (group.positives if r["label"] else group.negatives).append(passage)
    yield from groups.values()


# --- writing ------------------------------------------------------------------------------------


def content_id(text: str) -> str:
    """The stable id of a text without one: the first 16 hex digits of SHA-1 of its UTF-8 bytes."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _flagembedding(group: _Group, has_scores: bool) -> dict[str, Any]:
    line: dict[str, Any] = {
        "query": group.query,
        "pos": [p.text for p in group.positives],
        "neg": [p.text for p in group.negatives],
    }
    if has_scores:
        line["pos_scores"] = [p.score for p in group.positives]
        line["neg_scores"] = [p.score for p in group.negatives]
    line["prompt"] = ""
    return line


def _tevatron(group: _Group) -> dict[str, Any]:
    def passage(p: _Passage) -> dict[str, str]:
        return {"docid": str(p.id) if p.id is not None else content_id(p.text), "title": "", "text": p.text}

    return {
        "query_id": str(group.query_id) if group.query_id is not None else content_id(group.query),
        "query": group.query,
        "positive_passages": [passage(p) for p in group.positives],
        "negative_passages": [passage(p) for p in group.negatives],
    }
