"""A drop-in for sentence-transformers' `mine_hard_negatives`: the same signature, defaults and
output columns, over hardneg's pipeline.

    from hardneg import mine_hard_negatives   # instead of: from sentence_transformers.util import ...
    dataset = mine_hard_negatives(dataset, model, num_negatives=5, output_format="n-tuple")

The in-memory `Dataset` is written to Parquet in the work dir (`cache_folder`, else a temporary
folder) with content-hash ids, the model is identified by its files (stages/models.py:
`model_files`), and the real pipeline mines it: fingerprinted stages, a bounded memory, Ray when
`runner="ray"`. The pipeline returns every surviving candidate of the search window
(`labeled-list`, sampling `top`, `range_min` 0); the last step here applies sentence-transformers'
own selection to them — the window of `range_max` candidates (counting the query's positives, as
its search does), `range_min` skipped among the survivors of the score filters, `top` or `random`
— and builds its columns, so the rows and negatives are those sentence-transformers would mine
from the same vectors. hardneg's extras (`filters`, `miners`, `consistency_top_k`,
`false_negatives` and any other config key) are off unless given.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hardneg.stages.ingest import content_id

FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
PRECISIONS = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def mine_hard_negatives(  # long: the signature is sentence-transformers', argument for argument (37 lines)
    dataset,
    model,
    anchor_column_name: str | None = None,
    positive_column_name: str | None = None,
    corpus: list[str] | None = None,
    cross_encoder=None,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    num_negatives: int = 3,
    sampling_strategy: str = "top",
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    include_positives: bool = False,
    output_format: str = "triplet",
    output_scores: bool = False,
    batch_size: int = 32,
    faiss_batch_size: int = 16384,
    use_faiss: bool = False,
    use_multi_process: list[str] | bool = False,
    verbose: bool = True,
    cache_folder: str | None = None,
    *,
    filters: list[dict] | None = None,
    miners: list[str] | None = None,
    consistency_top_k: int | None = None,
    false_negatives: bool = False,
    work_dir: str | Path | None = None,
    runner: str = "local",
    **config: Any,
):
    """sentence-transformers' `mine_hard_negatives` (6.2) on hardneg's pipeline; see the module
    docstring. `faiss_batch_size`, `use_faiss` and `use_multi_process` are accepted and unused:
    hardneg always searches a FAISS index (exact up to `index.exact_threshold` documents) in query
    batches, and parallelises with Ray (`runner="ray"`). Extras, keyword-only: `filters` (hardneg's
    filter chain, default none), `miners` (default `["dense"]`), `consistency_top_k`,
    `false_negatives=True` (prepend hardneg's default false-negative filters), `work_dir` (wins
    over `cache_folder`), `runner`, and any other MineConfig key (`seed`, `index`, `bm25`, ...)."""
    from hardneg.pipeline.config import DEFAULT_FILTERS

    anchor, positive = _columns(dataset, anchor_column_name, positive_column_name)
    output_format = _check_format(output_format, include_positives, num_negatives)
    queries, positives = list(dataset[anchor]), list(dataset[positive])
    max_positives = max(_count_per_query(queries).values())
    scored = any(v is not None for v in (absolute_margin, relative_margin, max_score, min_score))
    if range_max is None:
        # sentence-transformers' default window: room for the positives, and 10x for the score filters
        wide = (absolute_margin is not None or relative_margin is not None or max_score is not None
                or (cross_encoder is not None and min_score is not None))
        range_max = range_min + num_negatives * (10 if wide else 1) + max_positives
    _check_range(range_min, range_max, num_negatives)
    own = sampling_strategy in ("top", "random")  # selected here exactly as sentence-transformers does
    use_ce = cross_encoder is not None and scored  # sentence-transformers rescores only to filter
    chain = [*(DEFAULT_FILTERS if false_negatives else []), *(filters or [])]

    root = Path(work_dir or cache_folder) if (work_dir or cache_folder) else Path(tempfile.mkdtemp(prefix="hardneg-"))
    root.mkdir(parents=True, exist_ok=True)
    # The pipeline's output is read back into a Dataset and removed; it lives outside the work
    # dir, which may never contain an output.
    scratch = Path(tempfile.mkdtemp(prefix="hardneg-dropin-"))
    try:
        inputs = _write_inputs(root, queries, positives, corpus)
        # The pipeline's window of unmasked candidates: sentence-transformers searches
        # range_max + max_positives documents and masks the query's own positives (>= 1).
        window = range_max + max_positives - (0 if include_positives else 1)
        keys = dict(
            pairs=inputs.pairs, corpus=inputs.corpus, query_column="query", positive_column="positive",
            query_id_column="query_id", positive_id_column="positive_id", corpus_id_column="_id",
            corpus_text_column="text", out=scratch / "out", work_dir=root, layout="disk", metadata_columns=True,
            format="labeled-list",  # keeps every pair and what it found; the columns are built below
            **_model_keys(model, root, query_prompt_name, query_prompt, corpus_prompt_name, corpus_prompt),
            embed_batch_size=batch_size, miners=list(miners or ["dense"]), filters=chain,
            consistency_top_k=consistency_top_k, runner=runner,
            max_score=max_score, min_score=min_score, absolute_margin=absolute_margin, relative_margin=relative_margin,
            range_max=window if own else range_max,
            range_min=0 if own else range_min,
            num_negatives=window if own else num_negatives,  # own selection: keep every candidate
            sampling_strategy="top" if own else sampling_strategy,
        )
        if use_ce:
            keys.update(cross_encoder=_model_path(cross_encoder, root), score="cross_encoder", ce_batch_size=batch_size,
                        ce_max_length=getattr(cross_encoder, "max_length", None))
        keys.update(config)
        rows = _mine(keys, verbose)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not (work_dir or cache_folder):
            shutil.rmtree(root, ignore_errors=True)
    pairs = _Pairs.from_output(rows, inputs)
    if own:
        pairs.select(range_min=range_min, range_max=range_max, max_positives=max_positives, k=num_negatives,
                     strategy=sampling_strategy, include_positives=include_positives,
                     window=(miners or ["dense"]) == ["dense"], seed=int(config.get("seed", 12)))
    return _to_dataset(pairs, output_format, output_scores, anchor, positive, num_negatives)


# ------------------------------------------------------------------------- arguments

def _columns(dataset, anchor: str | None, positive: str | None) -> tuple[str, str]:
    if len(dataset) == 0:
        raise ValueError("The dataset is empty. Please provide a non-empty dataset.")
    columns = dataset.column_names
    if not anchor or anchor not in columns:
        anchor = columns[0]
    if not positive or positive not in columns:
        if len(columns) < 2:
            raise ValueError("Dataset must contain at least two columns to select the positive column automatically.")
        positive = columns[1]
    return anchor, positive


def _check_format(output_format: str, include_positives: bool, num_negatives: int) -> str:
    if include_positives:
        output_format = "n-tuple"  # sentence-transformers: keeps the ranking order
    if output_format not in FORMATS:
        raise ValueError(f"Invalid output_format: {output_format}. Must be one of {', '.join(map(repr, FORMATS))}.")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got num_negatives={num_negatives}.")
    return output_format


def _check_range(range_min: int, range_max: int, num_negatives: int) -> None:
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got range_min={range_min}.")
    if range_min >= range_max:
        raise ValueError(f"range_min must be smaller than range_max, got range_min={range_min} and range_max={range_max}.")
    if num_negatives > range_max - range_min:
        raise ValueError(f"Cannot mine {num_negatives} negatives per query: only {range_max - range_min} candidates "
                         f"remain after skipping the first range_min={range_min} of range_max={range_max}.")


def _count_per_query(queries: list[str]) -> dict[str, int]:
    """Rows per query, as sentence-transformers counts them to size its search window."""
    counts: dict[str, int] = {}
    for query in queries:
        counts[query] = counts.get(query, 0) + 1
    return counts


def _prompt(model, name: str | None, text: str | None, task: str, fallbacks: tuple[str, ...]) -> str | None:
    """The prefix sentence-transformers' encode_query / encode_document would add: an explicit
    prompt, else the named prompt, else the model's prompt for the task (if it has one)."""
    if text is not None:
        return text or None
    prompts = getattr(model, "prompts", None) or {}
    if name is not None:
        if name not in prompts:
            raise ValueError(f"Prompt name '{name}' not found in the configured prompts dictionary with keys {list(prompts)!r}.")
        return prompts[name] or None
    for candidate in (task, *fallbacks):
        if candidate in prompts:
            return prompts[candidate] or None
    default = getattr(model, "default_prompt_name", None)
    return (prompts.get(default) or None) if default else None


def _model_path(model, root: Path) -> str:
    from hardneg.stages.models import model_files

    return model_files(model, root)


def _model_keys(model, root: Path, query_prompt_name, query_prompt, corpus_prompt_name, corpus_prompt) -> dict[str, Any]:
    similarity = getattr(model, "similarity_fn_name", "cosine") or "cosine"
    if similarity not in ("cosine", "dot"):  # on normalised vectors the two are the same
        raise ValueError(f"hardneg mines by cosine similarity; this model's similarity is {similarity!r}")
    return dict(
        model=_model_path(model, root),
        query_prompt=_prompt(model, query_prompt_name, query_prompt, "query", ()),
        corpus_prompt=_prompt(model, corpus_prompt_name, corpus_prompt, "document", ("passage", "corpus")),
        max_seq_length=getattr(model, "max_seq_length", None) or None,
        precision=PRECISIONS.get(str(getattr(model, "dtype", "torch.float32")), "fp32"),
        device=str(getattr(model, "device", "cpu")),
        trust_remote_code=bool(getattr(model, "trust_remote_code", False)),
    )


# ------------------------------------------------------------------------- the pipeline run

@dataclass
class _Inputs:
    pairs: Path
    corpus: Path | None
    texts: dict[str, str]  # id -> the caller's own text (the pipeline strips whitespace)
    query_rank: dict[str, int]  # query id -> position of its first row (sentence-transformers' order)
    pair_rank: dict[tuple[str, str], int]  # (query id, positive id) -> position of its first row


def _write_parquet(path: Path, table: pa.Table) -> Path:
    """Write once under a content-hash name (same data, same file: the ingest stage stays cached)."""
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        pq.write_table(table, tmp)
        tmp.replace(path)
    return path


def _digest(*columns: list[str]) -> str:
    digest = hashlib.sha256()
    for column in columns:
        digest.update(json.dumps(column).encode())
    return digest.hexdigest()[:16]


def _write_inputs(root: Path, queries: list[str], positives: list[str], corpus: list[str] | None) -> _Inputs:
    folder = root / "inputs"
    folder.mkdir(exist_ok=True)
    query_ids = [content_id(q) for q in queries]
    positive_ids = [content_id(p) for p in positives]
    texts = dict(zip(query_ids, queries)) | dict(zip(positive_ids, positives))
    pairs = pa.table({"query": queries, "positive": positives, "query_id": query_ids, "positive_id": positive_ids})
    pairs_path = _write_parquet(folder / f"pairs-{_digest(queries, positives)}.parquet", pairs)
    corpus_path = None
    if corpus is not None:
        docs = list(dict.fromkeys(corpus))
        ids = [content_id(d) for d in docs]
        texts.update(zip(ids, docs))
        corpus_path = _write_parquet(folder / f"corpus-{_digest(docs)}.parquet", pa.table({"_id": ids, "text": docs}))
    query_rank: dict[str, int] = {}
    pair_rank: dict[tuple[str, str], int] = {}
    for row, (q, p) in enumerate(zip(query_ids, positive_ids)):
        query_rank.setdefault(q, row)
        pair_rank.setdefault((q, p), row)
    return _Inputs(pairs_path, corpus_path, texts, query_rank, pair_rank)


def _mine(keys: dict[str, Any], verbose: bool) -> list[dict[str, Any]]:
    import datasets

    from hardneg.pipeline.api import run_mine
    from hardneg.pipeline.config import MineConfig

    result = run_mine(MineConfig(**keys), progress=verbose)
    return datasets.load_from_disk(str(result.out)).to_list()


# ------------------------------------------------------------------------- selection and columns

@dataclass
class _Pair:
    query_id: str
    positive_id: str
    positive_score: float
    negatives: list[str]  # ids, best first
    scores: list[float]
    ranks: list[int]


class _Pairs:
    def __init__(self, pairs: list[_Pair], inputs: _Inputs) -> None:
        self.pairs = pairs
        self.inputs = inputs

    @classmethod
    def from_output(cls, rows: list[dict[str, Any]], inputs: _Inputs) -> "_Pairs":
        """The pipeline's `labeled-list` rows (with metadata) as one record per (query, positive),
        in sentence-transformers' order: queries by first appearance, then their positives."""
        pairs = [_Pair(r["query_id"], r["positive_id"], r["positive_score"], list(r["negative_ids"] or []),
                       list(r["negative_scores"] or []), list(r["negative_ranks"] or [])) for r in rows]
        pairs.sort(key=lambda p: (inputs.query_rank[p.query_id], inputs.pair_rank[(p.query_id, p.positive_id)]))
        return cls(pairs, inputs)

    def select(self, *, range_min: int, range_max: int, max_positives: int, k: int, strategy: str,
               include_positives: bool, window: bool, seed: int) -> None:
        """sentence-transformers' choice among each query's candidates: the search window of
        range_max + max_positives documents (the query's own positives counted in it), what is
        left after masking and the score filters, sorted by score, cut to range_max, range_min of
        them skipped, then the top k or k at random (a seeded draw per query), best first."""
        rng = random.Random(seed)
        by_query: dict[str, list[_Pair]] = {}
        for pair in self.pairs:
            by_query.setdefault(pair.query_id, []).append(pair)
        for group in by_query.values():
            # Every pair of a query has the same candidates (filters and `top` work per query).
            first = group[0]
            cands = list(zip(first.scores, first.negatives, first.ranks))
            searched = range_max + max_positives
            if window and not include_positives:
                cands = [c for c in cands if c[2] is None or c[2] <= searched - len(group)]
            if include_positives:  # nothing masked: the positives compete with the candidates
                cands = sorted([(p.positive_score, p.positive_id, 0) for p in group] + cands, key=lambda c: -c[0])
                cands = cands[:searched] if window else cands
            cands = sorted(cands, key=lambda c: -c[0])[:range_max][range_min:]
            if strategy == "random":
                # sentence-transformers' draw, query by query: k of max(k, survivors) positions
                # (those past the survivors are dropped), so with random.seed(seed) before its
                # call both draw the same negatives.
                drawn = rng.sample(range(max(k, len(cands))), k)
                cands = sorted((cands[j] for j in drawn if j < len(cands)), key=lambda c: -c[0])
            cands = cands[:k]
            for pair in group:
                pair.scores, pair.negatives = [c[0] for c in cands], [c[1] for c in cands]


def _to_dataset(pairs: _Pairs, output_format: str, output_scores: bool, anchor: str, positive: str, k: int):
    """sentence-transformers' columns and types (built the way it builds them: from Python lists)."""
    from datasets import Dataset

    text = pairs.inputs.texts
    data: dict[str, list] = {anchor: [], positive: []}
    if output_format == "triplet":
        data["negative"] = []
        if output_scores:
            data["scores"] = []
        for p in pairs.pairs:
            for neg, score in zip(p.negatives, p.scores):
                data[anchor].append(text[p.query_id])
                data[positive].append(text[p.positive_id])
                data["negative"].append(text[neg])
                if output_scores:
                    data["scores"].append([p.positive_score, score])
    elif output_format == "n-tuple":
        full = [p for p in pairs.pairs if len(p.negatives) >= k]  # sentence-transformers drops short rows
        data[anchor] = [text[p.query_id] for p in full]
        data[positive] = [text[p.positive_id] for p in full]
        for i in range(k):
            data[f"negative_{i + 1}"] = [text[p.negatives[i]] for p in full]
        if output_scores:
            data["scores"] = [[p.positive_score, *p.scores[:k]] for p in full]
    elif output_format == "labeled-pair":
        data["score" if output_scores else "label"] = []
        column = data["score" if output_scores else "label"]
        groups: dict[str, list[_Pair]] = {}
        for p in pairs.pairs:
            groups.setdefault(p.query_id, []).append(p)
        for query_id, group in groups.items():  # a query's positives, then its negatives once
            for p in group:
                data[anchor].append(text[query_id])
                data[positive].append(text[p.positive_id])
                column.append(p.positive_score if output_scores else 1)
            for neg, score in zip(group[0].negatives, group[0].scores):
                data[anchor].append(text[query_id])
                data[positive].append(text[neg])
                column.append(score if output_scores else 0)
    else:  # labeled-list: rows with at least one negative
        kept = [p for p in pairs.pairs if p.negatives]
        data[anchor] = [text[p.query_id] for p in kept]
        data[positive] = [[text[p.positive_id], *(text[n] for n in p.negatives)] for p in kept]
        if output_scores:
            data["scores"] = [[p.positive_score, *p.scores] for p in kept]
        else:
            data["labels"] = [[1] + [0] * len(p.negatives) for p in kept]
    return Dataset.from_dict(data)
