"""Signals for the false negatives hardneg's defaults let through, measured on half A only.

Run after benchmarks/fn_curve.py, on its work dir. For each collection it reads the defaults'
filter table (every candidate with its decision) and the anchor's (`range_min` 0, no filter), and
asks two things of each candidate signal, on the queries of half A only (the half the defaults
were chosen on; half B's judgements are never read):

1. **residual AUC**: among the candidates the defaults keep at fused rank <= 60 (where the
   negatives come from), how well the signal ranks the judged-relevant ones (the false negatives
   still to catch) above the others. 0.5 is no information.
2. **the rule**: the signal as one more filter after the defaults, top-5 sampling simulated again,
   each part placed against the anchor's curve exactly as fn_curve.py places it (the defaults' row
   reproduces fn_curve.py's half-A ratios), and C = the worst of Cranfield A's ratio, CACM A's
   ratio and half the pooled dense A ratio. A setting would replace the defaults only if it is
   valid (mean rank <= 25, coverage >= 0.98 on every part) with C at least 25% below the defaults'.

Signals (higher = more likely relevant to the query):
* `neighbour_positive`: the candidate is a known positive of another query of the run; 1/k for the
  k-th nearest such query by query-query cosine (the dataset's own labels, passed between queries);
* `shared_neighbours`: the share of the positive's 20 nearest documents that are also among the
  candidate's 20 nearest (doc-doc cosine: a relation through the collection, not a direct one);
* `pseudo_relevance`: cosine to the nearest of the query's top 3 candidates (themselves excluded);
* `query_positive_terms`: BM25 score with the query's terms that also occur in its positive;
* `passages` (`--passages`, embeds the candidates again): the query's best cosine to any two
  consecutive sentences of the candidate (max-passage scoring).
Then unions of the first three (neighbour k 2 or 5, pseudo_relevance pct 90 or 95, shared
neighbours >= 0.4 or not), the fifteenth session's second search.
The features the defaults already use (BM25 score, lexical score) and the dense score and the
cosine to the positive are listed for their residual AUC only. `neighbour_positive` and
`pseudo_relevance` also exist as filters; together (k 2, pct 95) they halved half A's false
negatives and caught none on half B (benchmarks/RESULTS.md), so they are opt-in, not defaults.

    python benchmarks/fn_curve.py --beir examples/cranfield --beir examples/cacm --work-dir CACHE
    python benchmarks/fn_signals.py --beir examples/cranfield --beir examples/cacm --work-dir CACHE [--passages]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fn_curve  # noqa: E402  (sets HF_HUB_OFFLINE and puts the checkout on the path)

RESIDUAL_DEPTH = 60
NEIGHBOURS = 20
PSEUDO_RELEVANT = 3


class Collection:
    """One collection's cached tables, half A's judgements and exact corpus ranks."""

    def __init__(self, beir: Path, work: Path) -> None:
        from hardneg.pipeline.outputs.evaluate import corpus_ranks, query_half, read_qrels
        from hardneg.stages.io import embedding_matrix, read_table

        self.name = beir.resolve().name
        stats = json.loads((fn_curve.run_dir(work, {}) / "stats.json").read_text())
        self.stages = {name: Path(stage["path"]) for name, stage in stats["stages"].items()}
        self.config = stats["config"]
        self.rows = [{**r, "collection": self.name} for r in read_table(self.stages["filter"]).to_pylist()]
        anchor = json.loads((fn_curve.run_dir(work, {**fn_curve.ANCHOR, "range_min": 0}) / "stats.json").read_text())
        self.anchor_rows = read_table(Path(anchor["stages"]["filter"]["path"])).to_pylist()
        qrels = read_qrels(beir, self.config["split"])
        self.half_a = {q for q in qrels if qrels[q] and query_half(q) == 0}
        self.qrels = {q: set(qrels[q]) for q in self.half_a}  # half B's judgements are never kept
        index = self.stages["index"]
        self.vectors = np.load(index / "vectors.npy")
        self.row_of = {d: i for i, d in enumerate(read_table(index / "ids", columns=["doc_id"]).column("doc_id").to_pylist())}
        queries = read_table(self.stages["embed_queries"], columns=["query_id", "embedding"])
        self.query_ids = queries.column("query_id").to_pylist()
        self.query_vectors = embedding_matrix(queries).astype(np.float32)
        self.query_row = {q: i for i, q in enumerate(self.query_ids)}
        half = [r for r in self.rows if r["query_id"] in self.half_a]
        targets = [np.array([self.row_of[d] for d in r["candidate_ids"]], dtype=np.int64) for r in half]
        ranks = corpus_ranks(self.vectors, self.query_vectors[[self.query_row[r["query_id"]] for r in half]], targets)
        self.rank_of = {(r["query_id"], d): int(k) for r, rs in zip(half, ranks) for d, k in zip(r["candidate_ids"], rs)}

    def loaded(self, negatives: dict[str, list[str]]) -> SimpleNamespace:
        """What fn_curve.point reads of an evaluated output, for simulated negatives."""
        groups = [{"query_id": q, "negative_ids": ids} for q, ids in negatives.items()]
        return SimpleNamespace(groups=groups, qrels=self.qrels, rank_of=self.rank_of, k=fn_curve.NUM_NEGATIVES)


def top_kept(rows: list[dict], keep: Callable[[dict], np.ndarray]) -> dict[str, list[str]]:
    """Top sampling: each query's first num_negatives candidates by fused rank among those kept."""
    out = {}
    for r in rows:
        kept = np.flatnonzero(keep(r))
        kept = kept[np.argsort(np.asarray(r["fused_ranks"])[kept], kind="stable")]
        out[r["query_id"]] = [r["candidate_ids"][i] for i in kept[:fn_curve.NUM_NEGATIVES]]
    return out


def defaults_keep(extra: Callable[[dict], np.ndarray] | None = None) -> Callable[[dict], np.ndarray]:
    def keep(r: dict) -> np.ndarray:
        kept = np.asarray(r["decisions"]) == "kept"
        return kept & ~extra(r) if extra is not None else kept
    return keep


def measure(collections: list[Collection], keep: Callable[[dict], np.ndarray]) -> dict[str, Any]:
    """Half-A ratios of one setting: each collection's half A, the pooled dense half-A queries, and C."""
    parts = {f"{c.name} A": [(c, c.half_a)] for c in collections}
    parts["pooled dense A"] = [(c, {q for q in c.half_a if len(c.qrels[q]) >= 10}) for c in collections]
    figures = {}
    for part, members in parts.items():
        ids = [qs for _, qs in members]
        anchor = [{"range_min": r, **fn_curve.point(
            [c.loaded(top_kept(c.anchor_rows, lambda row, r=r: np.asarray(row["fused_ranks"]) > r)) for c, _ in members], ids)}
            for r in fn_curve.RANGE_MINS]
        figures[part] = fn_curve.place(fn_curve.point([c.loaded(top_kept(c.rows, keep)) for c, _ in members], ids), anchor)
    ratios = [figures[p]["ratio"] for p in parts if p != "pooled dense A"] + [figures["pooled dense A"]["ratio"] / 2]
    valid = all(f["mean_rank"] <= 25 and f["coverage"] >= 0.98 for f in figures.values())
    return {"parts": figures, "C": max(ratios), "valid": valid}


# ---------------------------------------------------------------------------- signals
def _percentile_drop(value: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x > np.nanpercentile(x, value) if np.isfinite(x).any() else np.zeros(len(x), bool)


def neighbour_positive(c: Collection) -> Callable[[dict], np.ndarray]:
    similarity = c.query_vectors @ c.query_vectors.T
    np.fill_diagonal(similarity, -np.inf)
    neighbour_rank = np.argsort(np.argsort(-similarity, axis=1), axis=1) + 1
    positive_of: dict[str, list[int]] = {}
    for r in c.rows:
        for p in r["positive_ids"]:
            positive_of.setdefault(p, []).append(c.query_row[r["query_id"]])

    def feature(r: dict) -> np.ndarray:
        q = c.query_row[r["query_id"]]
        return np.array([max((1.0 / neighbour_rank[q, o] for o in positive_of.get(d, []) if o != q), default=0.0)
                         for d in r["candidate_ids"]])
    return feature


def shared_neighbours(c: Collection) -> Callable[[dict], np.ndarray]:
    similarity = c.vectors @ c.vectors.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argpartition(-similarity, NEIGHBOURS, axis=1)[:, :NEIGHBOURS]
    member = np.zeros(similarity.shape, dtype=bool)
    np.put_along_axis(member, nearest, True, axis=1)
    member = member.astype(np.float32)

    def feature(r: dict) -> np.ndarray:
        rows = [c.row_of[d] for d in r["candidate_ids"]]
        positives = [c.row_of[p] for p in r["positive_ids"] if p in c.row_of]
        return (member[rows] @ member[positives].T).max(axis=1) / NEIGHBOURS if positives else np.full(len(rows), np.nan)
    return feature


def pseudo_relevance(c: Collection) -> Callable[[dict], np.ndarray]:
    def feature(r: dict) -> np.ndarray:
        rows = np.array([c.row_of[d] for d in r["candidate_ids"]])
        seeds = rows[np.argsort(r["fused_ranks"], kind="stable")[:PSEUDO_RELEVANT]]
        cosines = (c.vectors[rows] @ c.vectors[seeds].T).max(axis=1)
        return np.where(np.isin(rows, seeds), np.nan, cosines)
    return feature


def query_positive_terms(c: Collection) -> Callable[[dict], np.ndarray]:
    from hardneg.stages.engines.bm25 import BM25Config
    from hardneg.stages.lexical import PositiveLexicon

    positives = sorted({p for r in c.rows for p in r["positive_ids"]})
    lexicon = PositiveLexicon(c.stages["bm25_index"], BM25Config(**c.config["bm25"]), c.stages["ingest"] / "corpus", positives)
    texts, index = lexicon.texts, lexicon.index

    def feature(r: dict) -> np.ndarray:
        query, *docs = index.prepare([r["text"]] + [texts[p] for p in r["positive_ids"] if p in texts])
        terms = query[np.isin(query, np.concatenate(docs))] if docs else query[:0]
        rows = index.rows_of(pa.array(r["candidate_ids"], pa.string()))
        return index.score_rows([terms], np.zeros(len(rows), dtype=np.int64), rows)
    return feature


def passages(c: Collection) -> Callable[[dict], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    from hardneg.stages.io import iter_batches
    from hardneg.stages.models import resolve_model

    wanted = {d for r in c.rows if r["query_id"] in c.half_a for d in r["candidate_ids"]}
    windows, owner = [], []
    for batch in iter_batches(c.stages["ingest"] / "corpus", 4096, columns=["doc_id", "text"]):
        for doc, text in zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()):
            if doc in wanted:
                sentences = [s for s in re.split(r"(?<=[.?!])\s+", text.strip()) if len(s) > 3] or [text]
                found = [" ".join(sentences[i:i + 2]) for i in range(max(1, len(sentences) - 1))]
                windows += found
                owner += [doc] * len(found)
    model = SentenceTransformer(resolve_model(c.config["model"]), device="cpu")
    vectors = model.encode(windows, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
    of: dict[str, list[int]] = {}
    for i, doc in enumerate(owner):
        of.setdefault(doc, []).append(i)

    def feature(r: dict) -> np.ndarray:
        query = c.query_vectors[c.query_row[r["query_id"]]]
        return np.array([float((vectors[of[d]] @ query).max()) if d in of else np.nan for d in r["candidate_ids"]])
    return feature


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def positive_cosine(c: Collection) -> Callable[[dict], np.ndarray]:
    return lambda r: _floats(r["positive_similarity"])


# name -> (feature builder, settings as (label, drop rule on a query's feature values)); no
# settings: residual AUC only (what the defaults or the anchor already read).
SIGNALS: dict[str, tuple[Callable, list[tuple[str, Callable[[np.ndarray], np.ndarray]]]]] = {
    "dense score": (lambda c: lambda r: _floats(r["dense_scores"]), []),
    "bm25 score (a default filter)": (lambda c: lambda r: _floats(r["bm25_scores"]), []),
    "lexical score (a default filter)": (lambda c: lambda r: _floats(r["positive_lexical_scores"]), []),
    "cosine to the positive": (positive_cosine, []),
    "neighbour_positive": (neighbour_positive, [(f"k <= {k}", lambda x, k=k: x >= 1.0 / k) for k in (2, 5, 20)]),
    "shared_neighbours": (shared_neighbours, [(f">= {t}", lambda x, t=t: x >= t) for t in (0.3, 0.4)]
                          + [(f"pct {v}", _percentile_drop(v)) for v in (80, 90)]),
    "pseudo_relevance": (pseudo_relevance, [(f"pct {v}", _percentile_drop(v)) for v in (80, 90, 95)]),
    "query_positive_terms": (query_positive_terms, [(f"pct {v}", _percentile_drop(v)) for v in (75, 85, 95)]),
    "passages": (passages, [(f"pct {v}", _percentile_drop(v)) for v in (85, 90, 95)]),
}


def _rank_share(x: np.ndarray) -> np.ndarray:
    """Each value's share of its query's candidates it is above (ties share; no value: 0), the
    scale a per-query filter sees."""
    from scipy.stats import rankdata

    known = np.isfinite(x)
    out = np.zeros(len(x))
    if known.any():
        out[known] = (rankdata(x[known]) - 0.5) / len(x)
    return out


def residual(c: Collection):
    """(row, candidate positions, which are judged relevant) per half-A query: the candidates the
    defaults keep at fused rank <= RESIDUAL_DEPTH, where the false negatives still to catch are."""
    for r in c.rows:
        if r["query_id"] in c.half_a:
            at = np.flatnonzero((np.asarray(r["decisions"]) == "kept") & (np.asarray(r["fused_ranks"]) <= RESIDUAL_DEPTH))
            yield r, at, np.array([r["candidate_ids"][i] in c.qrels[r["query_id"]] for i in at], dtype=bool)


def residual_counts(c: Collection) -> tuple[int, int]:
    """(judged-relevant, all) of the residual candidates."""
    counts = [(int(relevant.sum()), len(relevant)) for _, _, relevant in residual(c)]
    return sum(n for n, _ in counts), sum(m for _, m in counts)


def residual_auc(c: Collection, feature: Callable[[dict], np.ndarray]) -> float | None:
    from sklearn.metrics import roc_auc_score

    parts = [(_rank_share(feature(r))[at], relevant) for r, at, relevant in residual(c)]
    scores = np.concatenate([x for x, _ in parts] + [np.zeros(0)])
    relevant = np.concatenate([y for _, y in parts] + [np.zeros(0, bool)])
    return float(roc_auc_score(relevant, scores)) if 0 < relevant.sum() < len(relevant) else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beir", type=Path, action="append", required=True, help="BEIR folder (repeat), as fn_curve.py ran")
    parser.add_argument("--work-dir", type=Path, required=True, help="fn_curve.py's --work-dir")
    parser.add_argument("--passages", action="store_true", help="also the passage signal (embeds the candidates again)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    opts = parser.parse_args(argv)
    collections = [Collection(beir, opts.work_dir / beir.resolve().name) for beir in opts.beir]
    names = [n for n in SIGNALS if opts.passages or n != "passages"]
    result: dict[str, Any] = {"defaults": measure(collections, defaults_keep()), "signals": {}}
    print(f"residual AUC: half A, candidates the defaults keep at fused rank <= {RESIDUAL_DEPTH}, judged-relevant vs the rest")
    print("  " + f"{'signal':<34}" + "".join(f"{c.name:>11}" for c in collections))
    counts = [residual_counts(c) for c in collections]
    result["residual"] = {c.name: {"relevant": n, "candidates": m} for c, (n, m) in zip(collections, counts)}
    print("  " + f"{'(relevant / candidates)':<34}" + "".join(f"{f'{n} / {m}':>11}" for n, m in counts))
    features = {}
    for name in names:
        features[name] = [SIGNALS[name][0](c) for c in collections]
        aucs = [residual_auc(c, f) for c, f in zip(collections, features[name])]
        result["signals"][name] = {"residual_auc": dict(zip([c.name for c in collections], aucs)), "settings": {}}
        print("  " + f"{name:<34}" + "".join(f"{a:>11.3f}" if a is not None else f"{'-':>11}" for a in aucs))

    def row(label: str, m: dict[str, Any]) -> None:
        cells = "".join(f"{p['ratio']:>7.3f}x {p['false_negatives']:>2} fn m{p['mean_rank']:>5.1f}" for p in m["parts"].values())
        print(f"  {label:<50}{cells}  C {m['C']:.3f}{'' if m['valid'] else '  (invalid)'}")

    print("\nthe defaults + one signal as a filter, half A: ratio to the anchor, false negatives, mean rank")
    print("  " + " " * 50 + "".join(f"{p:>25}" for p in result["defaults"]["parts"]))
    row("defaults", result["defaults"])
    for name in names:
        for label, drop in SIGNALS[name][1]:
            by_name = {c.name: f for c, f in zip(collections, features[name])}

            def extra(r: dict, drop=drop, by_name=by_name) -> np.ndarray:
                return drop(by_name[r["collection"]](r))
            m = measure(collections, defaults_keep(extra))
            result["signals"][name]["settings"][label] = m
            row(f"+ {name} {label}", m)
    # Unions of the three strongest (the rule was written before these were measured; RESULTS.md).
    print("\nthe defaults + a union of signals, half A")
    result["unions"] = {}
    for k, value, shared in itertools.product((2, 5), (90, 95), (False, True)):
        label = f"neighbour k <= {k} | pseudo pct {value}" + (" | shared >= 0.4" if shared else "")
        by = {name: dict(zip([c.name for c in collections], features[name]))
              for name in ("neighbour_positive", "pseudo_relevance", "shared_neighbours")}

        def union(r: dict, k=k, value=value, shared=shared, by=by) -> np.ndarray:
            drop = by["neighbour_positive"][r["collection"]](r) >= 1.0 / k
            drop |= _percentile_drop(value)(by["pseudo_relevance"][r["collection"]](r))
            return drop | (by["shared_neighbours"][r["collection"]](r) >= 0.4) if shared else drop
        result["unions"][label] = m = measure(collections, defaults_keep(union))
        row(label, m)
    bar = 0.75 * result["defaults"]["C"]
    measured = {f"{n} {label}": m for n in names for label, m in result["signals"][n]["settings"].items()}
    qualifying = [label for label, m in {**measured, **result["unions"]}.items() if m["valid"] and m["C"] <= bar]
    print(f"\nOn half A, valid with C <= {bar:.3f} (25% below the defaults' {result['defaults']['C']:.3f}): "
          + ("; ".join(qualifying) if qualifying else "none") + ". Half B decides (fn_curve.py), once.")
    result["qualifying"] = qualifying
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
