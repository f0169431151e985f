"""How closely `hardneg.mine_hard_negatives` reproduces sentence-transformers' own
`mine_hard_negatives`: both on the same Cranfield-subset Dataset (each query with every judged
document as a positive, the subset's documents as the corpus) and the same loaded model, with the
same arguments. Prints, per argument set, the rows of each, the share of identical negatives,
the largest score difference, and which pipeline stages hardneg recomputed.

    python benchmarks/dropin_agreement.py [--queries 20] [--docs 60] [--max-seq-length 64]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CASES = [
    *({"output_format": f, "output_scores": s} for f in ("triplet", "n-tuple", "labeled-pair", "labeled-list") for s in (False, True)),
    {"output_format": "n-tuple", "output_scores": True, "num_negatives": 4, "range_min": 3, "relative_margin": 0.05, "max_score": 0.8},
    {"output_format": "labeled-list", "range_max": 15, "sampling_strategy": "random", "seed": 7},
    {"output_format": "n-tuple", "num_negatives": 5, "include_positives": True},
]


def negatives(dataset, fmt: str) -> list[str]:
    second = dataset.column_names[1]
    if fmt in ("triplet", "n-tuple"):
        return [t for c in dataset.column_names if c.startswith("negative") for t in dataset[c]]
    if fmt == "labeled-pair":
        return list(dataset[second])
    return [t for row in dataset[second] for t in row]


def scores(dataset) -> list[float]:
    for column in ("scores", "score"):
        if column in dataset.column_names:
            return [v for row in dataset[column] for v in (row if isinstance(row, list) else [row])]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--max-seq-length", type=int, default=64)
    opts = parser.parse_args()

    import datasets
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    import hardneg
    import hardneg.pipeline.api as api
    from hardneg.stages.models import resolve_model
    from helpers import cranfield_subset, read_jsonl, read_qrels

    computed: list[list[str]] = []
    run_mine = api.run_mine
    api.run_mine = lambda cfg, progress=True: (r := run_mine(cfg, progress=progress), computed.append(r.computed))[0]
    root = Path(tempfile.mkdtemp(prefix="hardneg-dropin-"))
    beir = cranfield_subset(root / "beir", n_queries=opts.queries, n_docs=opts.docs)
    queries = {r["_id"]: r["text"] for r in read_jsonl(beir / "queries.jsonl")}
    docs = {r["_id"]: (r.get("title", "") + " " + r["text"]).strip() for r in read_jsonl(beir / "corpus.jsonl")}
    pairs = [(queries[q], docs[d]) for q, d, grade in read_qrels(beir) if grade > 0]
    dataset = datasets.Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [d for _, d in pairs]})
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    model.max_seq_length = opts.max_seq_length
    print(f"{len(pairs)} pairs, {len(queries)} queries, {len(docs)} documents, all-MiniLM-L6-v2 (max_seq_length {opts.max_seq_length})")
    print("| arguments | rows ST | rows hardneg | identical negatives | max score diff | hardneg recomputed |")
    print("|---|---:|---:|---:|---:|---|")
    for case in CASES:
        args = {"num_negatives": 3, "corpus": list(docs.values()), "verbose": False, **case}
        seed = args.pop("seed", None)
        if seed is not None:
            random.seed(seed)
        expected = st_mine(dataset, model, cache_folder=str(root / "st-cache"), **args)
        got = hardneg.mine_hard_negatives(dataset, model, cache_folder=str(root / "work"), **args,
                                          **({"seed": seed} if seed is not None else {}))
        a, b = negatives(expected, case["output_format"]), negatives(got, case["output_format"])
        same = sum(x == y for x, y in zip(a, b))
        diff = max((abs(x - y) for x, y in zip(scores(expected), scores(got))), default=0.0)
        label = ", ".join(f"{k}={v}" for k, v in case.items())
        print(f"| {label} | {expected.num_rows} | {got.num_rows} | {same}/{len(a)} | {diff:.1e} | {', '.join(computed[-1])} |",
              flush=True)


if __name__ == "__main__":
    main()
