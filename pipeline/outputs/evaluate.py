"""`hardneg eval`: how many of a mined dataset's negatives are false negatives, how hard they are,
and how many judged queries got a full set, against a BEIR folder's relevance judgements.

* `fn_rate`: the share of emitted negatives judged relevant (qrels score > 0) for their query,
  matched by id. With one row of K negatives per query it equals the mean P@K of a run made of
  the negatives against the qrels (the tests check it with ir_measures). Measure it on a dataset
  mined with `--hide-extra-positives`: otherwise every judged document is masked and it is 0.
* `median_rank`, `mean_rank`, `p75_rank`, `p90_rank`: the rank of each emitted negative in its
  query's dense ranking of the *whole* corpus under a reference model (default all-MiniLM-L6-v2):
  1 + the number of documents (positives included) scoring higher. Lower is harder. The median
  alone hides a tail of deep, easy negatives; the mean and the upper percentiles show it, and
  comparisons between settings are made at equal *mean* rank (benchmarks/fn_curve.py).
* `coverage`: the share of judged queries (>= 1 positive judgement in the split) that got the full
  K negatives in at least one row.

The same figures are broken down per source (`negative_sources`: a negative found by several
miners counts in each) and, when the run's filter stage output is still in its work dir, per
filter decision: how many candidates each filter dropped and how many of those were judged
relevant (the false negatives it caught).

The reference vectors come from the pipeline's own cache (`Pipeline.run_until_index`): the corpus
embeddings of the mining run are reused when the reference model is the mining model. Ranks are
computed by chunked matrix products over the memory-mapped vectors, never holding a queries x
corpus matrix beyond one chunk.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hardneg.pipeline.errors import EvalError
from hardneg.pipeline.outputs.reader import OutputFolder, read_stats

log = logging.getLogger("hardneg")

CORPUS_CHUNK = 16_384  # corpus rows per block of the rank scan
QUERY_BLOCK = 256  # queries per block of the rank scan
RANK_KEYS = ("median_rank", "mean_rank", "p75_rank", "p90_rank")
TIE = 1e-6  # a document scoring within this of a negative does not count as higher (float32 rounding)


# ---------------------------------------------------------------------------- inputs
def query_half(query_id: str) -> int:
    """A stable split of any query set in two: 0 when the first byte of sha256(id) is even, else
    1 (benchmarks tune on half 0, "A", and confirm on half 1, "B")."""
    return hashlib.sha256(str(query_id).encode("utf-8")).digest()[0] % 2


def read_qrels(beir: Path, split: str) -> dict[str, dict[str, float]]:
    """query id -> {doc id: grade} for the relevant judgements (grade > 0) of a BEIR split;
    lines ingest would reject are skipped."""
    from hardneg.stages.ingest import beir_file, read_judgements

    path = beir_file(Path(beir), f"qrels/{split}.tsv")
    if path is None:
        raise EvalError(f"BEIR folder {beir}: missing qrels/{split}.tsv")
    qrels: dict[str, dict[str, float]] = {}
    for judgement in read_judgements(path):
        if judgement.problem is None and judgement.grade > 0:
            qrels.setdefault(judgement.query_id, {})[judgement.doc_id] = judgement.grade
    return qrels


def read_groups(dataset: Path) -> list[dict[str, Any]]:
    """The dataset's pairs as {query_id, negative_ids, negative_sources, extra_positive_ids},
    whatever its format (n-tuple, triplet, labeled-pair, labeled-list), from its id metadata
    columns. Extra positives are the candidates `false_negatives: relabel` turned into positives
    (in labeled-pair: every label-1 row of a pair after its first, the pair's own positive)."""
    table = OutputFolder(dataset, EvalError).table()
    names = set(table.column_names)
    if "query_id" not in names:
        raise EvalError(f"dataset {dataset} has no query_id column: mine it with metadata_columns: true")
    rows = table.to_pylist()
    if "negative_ids" in names:  # n-tuple, labeled-list: one row per pair
        return [{"query_id": r["query_id"], "negative_ids": list(r["negative_ids"] or []),
                 "negative_sources": list(r.get("negative_sources") or [[] for _ in r["negative_ids"] or []]),
                 "extra_positive_ids": list(r.get("extra_positive_ids") or [])}
                for r in rows]
    groups: dict[Any, dict[str, Any]] = {}

    def group_of(r: dict[str, Any], key: Any) -> dict[str, Any]:
        return groups.setdefault(key, {"query_id": r["query_id"], "negative_ids": [], "negative_sources": [],
                                       "extra_positive_ids": [], "positives_seen": 0})

    if "negative_id" in names:  # triplet: K rows per pair
        for r in rows:
            group = group_of(r, r.get("pair_id") or (r["query_id"], r.get("positive_id")))
            group["negative_ids"].append(r["negative_id"])
            group["negative_sources"].append(list(r.get("negative_source") or []))
            group["extra_positive_ids"] = list(r.get("extra_positive_ids") or group["extra_positive_ids"])
    elif "passage_id" in names and "label" in names:  # labeled-pair: the positive, extras, negatives
        for r in rows:
            group = group_of(r, r.get("pair_id") or r["query_id"])
            if not r["label"]:
                group["negative_ids"].append(r["passage_id"])
                group["negative_sources"].append(list(r.get("sources") or []))
            else:
                group["positives_seen"] += 1
                if group["positives_seen"] > 1:
                    group["extra_positive_ids"].append(r["passage_id"])
    else:
        raise EvalError(f"dataset {dataset} has no negative id columns: mine it with metadata_columns: true")
    for group in groups.values():
        del group["positives_seen"]
    return list(groups.values())


# ---------------------------------------------------------------------------- ranks
def corpus_ranks(vectors: np.ndarray, queries: np.ndarray, targets: list[np.ndarray]) -> list[np.ndarray]:
    """For query i (a row of `queries`) and each document row in `targets[i]`: 1 + the number of
    corpus documents (rows of `vectors`) whose dot product with the query is higher. Chunked: at
    most QUERY_BLOCK x CORPUS_CHUNK scores are held at once."""
    out: list[np.ndarray] = []
    n = len(vectors)
    for begin in range(0, len(queries), QUERY_BLOCK):
        block = np.ascontiguousarray(queries[begin : begin + QUERY_BLOCK], dtype=np.float32)
        rows = targets[begin : begin + QUERY_BLOCK]
        own = []
        for q, r in zip(block, rows):
            order = np.argsort(r)
            own.append((np.asarray(vectors[r[order]], dtype=np.float32) @ q)[np.argsort(order)] if len(r) else np.zeros(0, np.float32))
        higher = [np.zeros(len(r), dtype=np.int64) for r in rows]
        for start in range(0, n, CORPUS_CHUNK):
            scores = np.asarray(vectors[start : start + CORPUS_CHUNK], dtype=np.float32) @ block.T
            for j in range(len(block)):
                if len(rows[j]):
                    column = np.sort(scores[:, j])
                    higher[j] += len(column) - np.searchsorted(column, own[j] + TIE, side="right")
        out.extend(h + 1 for h in higher)
    return out


def reference_index(beir: Path, model: str | None, work_dir: Path, split: str, stats: dict[str, Any]) -> tuple[Path, Path]:
    """The index dir (vectors.npy, ids/) and query embeddings of the reference model, from the
    pipeline's cache (computed and cached there when missing)."""
    from hardneg.pipeline.config import MineConfig
    from hardneg.pipeline.runner import Pipeline
    from hardneg.stages.models import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    keys: dict[str, Any] = {}
    mined = stats.get("config") or {}
    if mined.get("model") == model and not mined.get("corpus_embeddings"):
        # The mining run's embedding settings: its cached corpus vectors are reused as they are.
        for key in ("query_prompt", "corpus_prompt", "max_seq_length", "precision", "device", "embed_batch_size",
                    "threads", "trust_remote_code", "index"):
            if mined.get(key) is not None:
                keys[key] = mined[key]
    cfg = MineConfig(beir=Path(beir), split=split, positives="all", model=model, work_dir=Path(work_dir), runner="local", **keys)
    results = Pipeline(cfg, progress=False, require_out=False).run_until_index()
    return results["index"].path, results["queries"].path


def _ranks(index_dir: Path, queries_dir: Path, wanted: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    from hardneg.stages.io import embedding_matrix, iter_batches, read_table

    vectors = np.load(Path(index_dir) / "vectors.npy", mmap_mode="r")
    row_of = {d: i for i, d in enumerate(read_table(Path(index_dir) / "ids", columns=["doc_id"]).column("doc_id").to_pylist())}
    query_ids, query_vectors = [], []
    for batch in iter_batches(Path(queries_dir), 4096, columns=["query_id", "embedding"]):
        for query_id, vector in zip(batch.column("query_id").to_pylist(), embedding_matrix(batch)):
            if query_id in wanted:
                query_ids.append(query_id)
                query_vectors.append(vector)
    if not query_ids:
        return {}
    docs = [sorted(d for d in wanted[q] if d in row_of) for q in query_ids]
    targets = [np.array([row_of[d] for d in ds], dtype=np.int64) for ds in docs]
    ranks = corpus_ranks(vectors, np.asarray(query_vectors, dtype=np.float32), targets)
    return {(q, d): int(r) for q, ds, rs in zip(query_ids, docs, ranks) for d, r in zip(ds, rs)}


# ---------------------------------------------------------------------------- figures
def _summary(negatives: list[tuple[str, str]], qrels: dict[str, dict[str, float]], ranks: dict | None) -> dict[str, Any]:
    fn = sum(1 for q, d in negatives if d in qrels.get(q, {}))
    ranked = [ranks[(q, d)] for q, d in negatives if ranks is not None and (q, d) in ranks]
    return {
        "negatives": len(negatives),
        "false_negatives": fn,
        "fn_rate": fn / len(negatives) if negatives else None,
        **rank_figures(ranked),
    }


def rank_figures(ranked: list[int]) -> dict[str, float | None]:
    """Median, mean, 75th and 90th percentile (numpy's linear interpolation) of negatives' ranks."""
    if not ranked:
        return {"median_rank": None, "mean_rank": None, "p75_rank": None, "p90_rank": None}
    p50, p75, p90 = np.percentile(np.asarray(ranked, dtype=np.float64), [50, 75, 90])
    return {"median_rank": float(p50), "mean_rank": float(np.mean(ranked)), "p75_rank": float(p75), "p90_rank": float(p90)}


def filter_breakdown(filter_dir: Path, qrels: dict[str, dict[str, float]], query_ids: set[str] | None = None) -> dict[str, dict[str, int]]:
    """Per decision ("kept" or a filter's name): candidates, and how many were judged relevant."""
    from hardneg.stages.io import iter_batches

    out: dict[str, dict[str, int]] = {}
    for batch in iter_batches(Path(filter_dir), 4096, columns=["query_id", "candidate_ids", "decisions"]):
        for query_id, ids, decisions in zip(*(batch.column(c).to_pylist() for c in ("query_id", "candidate_ids", "decisions"))):
            if query_ids is not None and query_id not in query_ids:
                continue
            relevant = qrels.get(query_id, {})
            for doc_id, decision in zip(ids, decisions):
                bucket = out.setdefault(decision, {"candidates": 0, "judged_relevant": 0})
                bucket["candidates"] += 1
                bucket["judged_relevant"] += int(doc_id in relevant)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "kept", kv[0])))


def _check_judged(groups: list[dict[str, Any]], qrels: dict, dataset: Path, beir: Path, split: str) -> None:
    """Against qrels that judge none of the dataset's queries every figure would be 0 or empty,
    which reads as a perfect dataset: refuse instead (one line)."""
    mined = {g["query_id"] for g in groups}
    if mined and not mined & qrels.keys():
        raise EvalError(f"none of the {len(mined)} query ids of {dataset} is judged in {beir}/qrels/{split}.tsv: "
                        "give the BEIR folder the dataset was mined from")


def _default_work_dir(dataset: Path, stats: dict[str, Any]) -> Path:
    configured = (stats.get("config") or {}).get("work_dir")
    if configured:
        return Path(configured)
    index = ((stats.get("stages") or {}).get("index") or {}).get("path")
    if index and Path(index).parent.is_dir():
        return Path(index).parent
    from hardneg.pipeline.store import default_work_dir

    return default_work_dir(Path(dataset))


@dataclass
class Loaded:
    """A mined dataset read against its qrels, with every negative's reference rank: what the
    figures are computed from (`figures` restricts them to any set of queries)."""

    beir: Path
    dataset: Path
    split: str
    qrels: dict[str, dict[str, float]]
    groups: list[dict[str, Any]]
    k: int
    rank_of: dict[tuple[str, str], int] | None
    reference: str | None
    filter_dir: Path | None


def load(beir: Path, dataset: Path, *, split: str | None = None, model: str | None = None,
         work_dir: Path | None = None, query_ids: Iterable[str] | None = None, ranks: bool = True) -> Loaded:
    beir, dataset = Path(beir), Path(dataset)
    if not dataset.exists():
        raise EvalError(f"dataset not found: {dataset}")
    stats = read_stats(dataset)
    mined = stats.get("config") or {}
    split = split or mined.get("split") or "test"
    qrels = read_qrels(beir, split)
    keep = set(query_ids) if query_ids is not None else None
    groups = [g for g in read_groups(dataset) if keep is None or g["query_id"] in keep]
    _check_judged(groups, qrels, dataset, beir, split)
    k = int(mined.get("num_negatives") or max((len(g["negative_ids"]) for g in groups), default=0))
    negatives = [(g["query_id"], d) for g in groups for d in g["negative_ids"]]
    rank_of = None
    reference = None
    if ranks and negatives:
        from hardneg.stages.models import DEFAULT_MODEL

        reference = model or DEFAULT_MODEL
        work = Path(work_dir) if work_dir else _default_work_dir(dataset, stats)
        index_dir, queries_dir = reference_index(beir, reference, work, split, stats)
        wanted: dict[str, set[str]] = {}
        for q, d in negatives:
            wanted.setdefault(q, set()).add(d)
        rank_of = _ranks(index_dir, queries_dir, wanted)
    filter_path = ((stats.get("stages") or {}).get("filter") or {}).get("path")
    filter_dir = Path(filter_path) if filter_path and Path(filter_path).is_dir() else None
    return Loaded(beir, dataset, split, qrels, groups, k, rank_of, reference, filter_dir)


def figures(loaded: Loaded, query_ids: Iterable[str] | None = None, *, per_filter: bool = True) -> dict[str, Any]:
    """The eval figures of a loaded dataset, restricted to `query_ids` when given."""
    keep = set(query_ids) if query_ids is not None else None
    qrels, k, rank_of = loaded.qrels, loaded.k, loaded.rank_of
    groups = [g for g in loaded.groups if keep is None or g["query_id"] in keep]
    judged = {q for q, docs in qrels.items() if docs and (keep is None or q in keep)}
    covered = {g["query_id"] for g in groups if len(g["negative_ids"]) >= k and g["query_id"] in judged}
    negatives = [(g["query_id"], d) for g in groups for d in g["negative_ids"]]
    result: dict[str, Any] = {
        "dataset": str(loaded.dataset),
        "beir": str(loaded.beir),
        "split": loaded.split,
        "model": loaded.reference,
        "num_negatives": k,
        "rows": len(groups),
        **_summary(negatives, qrels, rank_of),
        "judged_queries": len(judged),
        "covered_queries": len(covered),
        "coverage": len(covered) / len(judged) if judged else None,
    }
    per_source: dict[str, list[tuple[str, str]]] = {}
    for g in groups:
        for d, sources in zip(g["negative_ids"], g["negative_sources"]):
            for source in sources or ["unknown"]:
                per_source.setdefault(source, []).append((g["query_id"], d))
    result["per_source"] = {s: _summary(v, qrels, rank_of) for s, v in sorted(per_source.items())}
    result["relabelled"] = _relabelled(groups, qrels)
    result["per_filter"] = (
        filter_breakdown(loaded.filter_dir, qrels, keep) if per_filter and loaded.filter_dir is not None else None
    )
    return result


def _relabelled(groups: list[dict[str, Any]], qrels: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Extra positives (`false_negatives: relabel`): how many, and the share judged relevant (their
    precision). Counted once per (query, document), however many pairs of the query carry it."""
    extra = {(g["query_id"], d) for g in groups for d in g.get("extra_positive_ids") or []}
    relevant = sum(1 for q, d in extra if d in qrels.get(q, {}))
    return {"extra_positives": len(extra), "judged_relevant": relevant,
            "precision": relevant / len(extra) if extra else None}


def evaluate(
    beir: Path,
    dataset: Path,
    *,
    split: str | None = None,
    model: str | None = None,
    work_dir: Path | None = None,
    query_ids: Iterable[str] | None = None,
    ranks: bool = True,
) -> dict[str, Any]:
    """The eval figures of a mined dataset as a dict (what `hardneg eval --json` writes).
    `query_ids` restricts every figure to those queries (e.g. one half of a query set)."""
    loaded = load(beir, dataset, split=split, model=model, work_dir=work_dir, query_ids=query_ids, ranks=ranks)
    return figures(loaded, query_ids)


# ---------------------------------------------------------------------------- printing
def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_report(result: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=100)
    console.print(f"[bold]hardneg eval[/bold] {result['dataset']} against {result['beir']} ({result['split']}), "
                  f"ranks under {result['model'] or '-'}")
    main = Table(title="False negatives, hardness, coverage", title_justify="left")
    for column in ("negatives", "false neg.", "fn_rate", "median rank", "mean rank", "p75", "p90", "covered", "coverage"):
        main.add_column(column, justify="right")
    main.add_row(_fmt(result["negatives"]), _fmt(result["false_negatives"]), _fmt(result["fn_rate"], "pct"),
                 *(_fmt(result[k]) for k in RANK_KEYS),
                 f"{result['covered_queries']}/{result['judged_queries']}", _fmt(result["coverage"], "pct"))
    console.print(main)
    sources = Table(title="Per source", title_justify="left")
    sources.add_column("source")
    for column in ("negatives", "false neg.", "fn_rate", "median rank", "mean rank", "p75", "p90"):
        sources.add_column(column, justify="right")
    for source, figures in result["per_source"].items():
        sources.add_row(source, _fmt(figures["negatives"]), _fmt(figures["false_negatives"]),
                        _fmt(figures["fn_rate"], "pct"), *(_fmt(figures[k]) for k in RANK_KEYS))
    console.print(sources)
    relabelled = result.get("relabelled") or {}
    if relabelled.get("extra_positives"):
        console.print(f"relabelled as extra positives: {relabelled['extra_positives']}, judged relevant "
                      f"{relabelled['judged_relevant']} (precision {_fmt(relabelled['precision'], 'pct')})")
    if result.get("per_filter"):
        filters = Table(title="Per filter decision (candidates of the filter stage)", title_justify="left")
        filters.add_column("decision")
        for column in ("candidates", "judged relevant", "share relevant"):
            filters.add_column(column, justify="right")
        for decision, figures in result["per_filter"].items():
            share = figures["judged_relevant"] / figures["candidates"] if figures["candidates"] else None
            filters.add_row(decision, str(figures["candidates"]), str(figures["judged_relevant"]), _fmt(share, "pct"))
        console.print(filters)
    else:
        console.print("per filter: the run's filter stage output is not in its work dir")
