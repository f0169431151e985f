"""Test data: tiny BEIR folders cut from the Cranfield sample shipped in examples/."""

from __future__ import annotations

import json
from pathlib import Path

CRANFIELD = Path(__file__).resolve().parent.parent / "examples" / "cranfield"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_qrels(folder: Path, split: str = "test") -> list[tuple[str, str, int]]:
    rows = []
    for line in (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        rows.append((q, d, int(s)))
    return rows


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]]) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    )
    return folder


def cranfield_subset(folder: Path, n_queries: int = 30, n_docs: int = 200) -> Path:
    """The first `n_queries` Cranfield queries, their judged documents and the first `n_docs`
    documents: small enough to embed in seconds, with real relevance judgements."""
    queries = read_jsonl(CRANFIELD / "queries.jsonl")[:n_queries]
    keep_q = {q["_id"] for q in queries}
    qrels = [r for r in read_qrels(CRANFIELD) if r[0] in keep_q]
    judged = {d for _, d, _ in qrels}
    corpus = [d for i, d in enumerate(read_jsonl(CRANFIELD / "corpus.jsonl")) if i < n_docs or d["_id"] in judged]
    return write_beir(folder, corpus, queries, qrels)
