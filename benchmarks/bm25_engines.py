"""Benchmark the two BM25 engines of stages.engines.bm25 on a synthetic Cranfield-based corpus.

The corpus is built by repeating the Cranfield documents. Copy 0 is the original.
Each later copy drops a seeded random ~10% of the words and gets a per-copy suffix
token, so documents differ in content and length. Exact copies would tie on almost
every query and measure tie handling rather than retrieval.

Both engines answer the same Cranfield queries with the same k. rank_bm25 scans the
whole corpus in Python for every query, so by default it is timed on a subset of
the queries, and its throughput is reported per query.

    python benchmarks/bm25_engines.py --docs 30000 --queries 225
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hardneg.stages.engines.bm25 import BM25Config, BM25Index

CRANFIELD = Path(__file__).resolve().parent.parent / "examples" / "cranfield"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_corpus(n_docs: int, seed: int = 0) -> tuple[list[str], list[str]]:
    base = [f"{d.get('title', '')} {d['text']}".strip() for d in _read_jsonl(CRANFIELD / "corpus.jsonl")]
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    texts: list[str] = []
    for i in range(n_docs):
        copy, text = divmod(i, len(base))
        text = base[text]
        if copy:
            words = text.split()
            keep = rng.random(len(words)) >= 0.1
            text = " ".join(w for w, kp in zip(words, keep) if kp) + f" copy{copy}"
        ids.append(f"d{i}")
        texts.append(text)
    return ids, texts


def load_queries(n: int) -> list[str]:
    queries = [q["text"] for q in _read_jsonl(CRANFIELD / "queries.jsonl")]
    return [queries[i % len(queries)] for i in range(n)]  # cycle if more are asked for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=30000, help="corpus size (default 30000)")
    ap.add_argument("--queries", type=int, default=225, help="queries timed on bm25s (default 225)")
    ap.add_argument("--rank-queries", type=int, default=20,
                    help="subset of the queries timed on rank_bm25 (default 20)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="bm25s retrieve n_threads (0 = sequential)")
    args = ap.parse_args()

    ids, texts = build_corpus(args.docs)
    queries = load_queries(args.queries)
    rank_queries = queries[: min(args.rank_queries, len(queries))]
    print(f"corpus: {len(ids)} docs (from Cranfield), k={args.k}")

    rows = []
    results = {}
    for engine, qs in (("bm25s", queries), ("rank_bm25", rank_queries)):
        cfg = BM25Config(engine=engine)
        t0 = time.perf_counter()
        index = BM25Index.build(ids, texts, cfg)
        build_s = time.perf_counter() - t0
        kwargs = {"n_threads": args.threads} if engine == "bm25s" else {}
        index.search(qs[:1], args.k, **kwargs)  # warm-up, not timed
        t0 = time.perf_counter()
        results[engine] = index.search(qs, args.k, **kwargs)
        search_s = time.perf_counter() - t0
        rows.append((engine, build_s, len(qs), search_s, len(qs) / search_s))

    print(f"\n{'engine':<10} {'build s':>9} {'queries':>8} {'search s':>9} {'queries/s':>11}")
    for engine, build_s, nq, search_s, qps in rows:
        print(f"{engine:<10} {build_s:>9.2f} {nq:>8} {search_s:>9.3f} {qps:>11.1f}")
    ratio = rows[0][4] / rows[1][4]
    print(f"\nthroughput ratio bm25s/rank_bm25: {ratio:.0f}x (target >= 100x)")
    if len(rank_queries) < len(queries):
        print(f"note: rank_bm25 timed on the first {len(rank_queries)} of {len(queries)} queries "
              "(it scans the whole corpus per query); queries/s is per-query throughput.")

    # Sanity: on the shared queries both engines must return the same ranking.
    n = len(rank_queries)
    same = results["bm25s"][0][:n] == results["rank_bm25"][0]
    close = all(np.allclose(a, b, rtol=0, atol=1e-4)
                for a, b in zip(results["bm25s"][1][:n], results["rank_bm25"][1]))
    print(f"parity on the {n} shared queries: ids {'identical' if same else 'DIFFER'}, "
          f"scores {'within 1e-4' if close else 'DIFFER'}")


if __name__ == "__main__":
    main()
