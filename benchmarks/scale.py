"""How hardneg's cost grows with the corpus: per-stage wall time and peak RSS (whole process
tree, sampled from /proc by psutil) for synthetic corpora of 10k, 100k and 1M documents.

Each size is mined by `hardneg mine` in a subprocess from precomputed vectors
(`--corpus-embeddings`, `query_embeddings`: normalised Gaussian-mixture vectors, dim 384),
with 10% as many queries, and BM25 over synthetic text with a Zipfian vocabulary (p ~ 1/rank,
the most frequent words being English stopwords, as in real text)
(`--miners dense,bm25`). The approximate index's recall@100 against exact search is measured
on 200 queries. `--embed` also times the embedding stage on short synthetic texts.

    python benchmarks/scale.py --quick            # 10k documents: under two minutes
    python benchmarks/scale.py                    # 10k, 100k, 1M
    python benchmarks/scale.py --embed 10000,50000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DIM = 384
CHUNK = 100_000


def zipf_vocabulary(vocab: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Words by frequency rank and their probabilities under Zipf's law (p ~ 1/rank, as in
    natural language). The most frequent words are BM25's English stopwords, so the tokenizer
    drops them as it drops "the" and "of" from real text (a third of the tokens)."""
    from hardneg.stages.engines.bm25 import _stopword_set

    stopwords = sorted(_stopword_set("en"))
    words = np.array(stopwords + [f"w{rank}" for rank in range(len(stopwords), vocab)], dtype=object)
    p = 1.0 / np.arange(1, vocab + 1)
    return words, p / p.sum()


def zipf_texts(rng: np.random.Generator, n_texts: int, length: int, vocabulary=zipf_vocabulary()) -> list[str]:
    words, p = vocabulary
    ranks = rng.choice(len(words), size=(n_texts, length), p=p)
    return [" ".join(row) for row in words[ranks]]


def mixture_vectors(rng: np.random.Generator, centers: np.ndarray, n: int) -> np.ndarray:
    """`n` normalised vectors of a Gaussian mixture around `centers` (noise 0.35 a dimension)."""
    vectors = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_inputs(folder: Path, n_docs: int, n_queries: int, seed: int = 0) -> dict[str, Path]:
    """A BEIR folder (text for BM25; each query judged against the document it was drawn near)
    and .npy vectors with ids for corpus and queries, all written in chunks."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, DIM)).astype(np.float32)
    (folder / "beir" / "qrels").mkdir(parents=True)
    corpus_npy = np.lib.format.open_memmap(folder / "corpus.npy", mode="w+", dtype=np.float32, shape=(n_docs, DIM))
    with open(folder / "beir" / "corpus.jsonl", "w") as text, open(folder / "corpus.ids.txt", "w") as ids:
        for start in range(0, n_docs, CHUNK):
            n = min(CHUNK, n_docs - start)
            corpus_npy[start:start + n] = mixture_vectors(rng, centers, n)
            for i, body in enumerate(zipf_texts(rng, n, 12)):
                doc_id = f"d{start + i}"
                ids.write(doc_id + "\n")
                text.write(json.dumps({"_id": doc_id, "title": "", "text": body}) + "\n")
    corpus_npy.flush()
    targets = rng.choice(n_docs, size=n_queries, replace=False)
    base = np.asarray(corpus_npy[np.sort(targets)])
    # A query is its judged document plus noise of norm ~1.3: cosine ~0.6 to it, about what a
    # bi-encoder gives a query and its positive.
    queries = base + 0.07 * rng.standard_normal(base.shape).astype(np.float32)
    np.save(folder / "queries.npy", queries / np.linalg.norm(queries, axis=1, keepdims=True))
    with open(folder / "beir" / "queries.jsonl", "w") as q, open(folder / "beir" / "qrels" / "test.tsv", "w") as qrels, \
            open(folder / "queries.ids.txt", "w") as ids:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, (target, body) in enumerate(zip(np.sort(targets), zipf_texts(rng, n_queries, 6))):
            ids.write(f"q{i}\n")
            q.write(json.dumps({"_id": f"q{i}", "text": body}) + "\n")
            qrels.write(f"q{i}\td{target}\t1\n")
    return {"beir": folder / "beir", "corpus": folder / "corpus.npy", "queries": folder / "queries.npy"}


class TreeRSS:
    """Peak resident memory and CPU seconds of a process and all its children, sampled every
    50 ms. CPU seconds over wall seconds say how many cores a stage kept busy."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self.current = 0
        self.cpu_by_pid: dict[int, float] = {}  # last seen; an exited worker keeps its last figure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                total = 0
                for proc in procs:
                    try:
                        total += proc.memory_info().rss
                        times = proc.cpu_times()
                        self.cpu_by_pid[proc.pid] = times.user + times.system
                    except psutil.Error:
                        pass
                self.current = total
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def take_peak(self) -> int:
        peak, self.peak = self.peak, self.current
        return peak

    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_pid.values())

    def stop(self) -> None:
        self._stop.set()


def mine(inputs: dict[str, Path], work: Path, runner: str) -> tuple[list[tuple[str, float, int, float]], float]:
    cmd = [sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(inputs["beir"]), "--out", str(work / "out"),
           "--work-dir", str(work / "work"), "--corpus-embeddings", str(inputs["corpus"]),
           "--set", f"query_embeddings={inputs['queries']}", "--miners", "dense,bm25", "--num-negatives", "5",
           "--runner", runner, "--log-level", "info"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    rss = TreeRSS(proc.pid)
    stages = []
    cpu_before = 0.0
    for line in proc.stderr:
        match = re.match(r"(\S+)\s+done\s+\(\w+\) in ([\d.]+)s", line.strip())
        if match:
            cpu = rss.cpu_seconds()
            stages.append((match.group(1), float(match.group(2)), rss.take_peak(), cpu - cpu_before))
            cpu_before = cpu
        elif "error" in line.lower():
            print(line, end="", file=sys.stderr)
    proc.wait()
    rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"hardneg mine failed ({proc.returncode})")
    return stages, time.perf_counter() - started


def recall_at_100(work: Path, inputs: dict[str, Path], n: int = 200) -> tuple[float, str]:
    from hardneg.stages.engines.faiss_index import AnnIndex, IndexConfig
    from hardneg.stages.calibrate import calibrated_config

    index_dir = next((work / "work").glob("index-*"))
    vectors = np.load(index_dir / "vectors.npy", mmap_mode="r")
    queries = np.load(inputs["queries"])[:n]
    config = IndexConfig()
    for calibration in (work / "work").glob("calibrate-*"):  # the search value the run mined with
        config = calibrated_config(config, calibration)
    ann = AnnIndex.load(index_dir / "faiss", config)
    _, found = ann.search(queries, 100)
    return recall(found, exact_top_k(vectors, queries, 100)), ann.description


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows by inner product (faiss's CPU flat index), the vectors added in chunks
    so that a memory-mapped file is never copied whole."""
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    for start in range(0, len(vectors), CHUNK):
        exact.add(np.ascontiguousarray(vectors[start:start + CHUNK]))
    return exact.search(queries, k)[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k rows that were found."""
    return sum(len(set(f) & set(t)) for f, t in zip(found, truth)) / truth.size


def embed_cost(n_texts: int) -> tuple[float, int]:
    """Seconds per text and peak RSS for embedding `n_texts` short synthetic texts in-process."""
    code = f"""
import numpy as np, pyarrow as pa, time, resource
from hardneg.stages.embed import EmbedStage
from benchmarks.scale import zipf_texts
texts = zipf_texts(np.random.default_rng(0), {n_texts}, 10)
stage = EmbedStage(model="all-MiniLM-L6-v2", id_column="id", text_column="text", threads=2)
stage.ensure_setup()
start = time.perf_counter()
for s in range(0, {n_texts}, 1024):
    batch = pa.table({{"id": [str(i) for i in range(s, min(s + 1024, {n_texts}))], "text": texts[s:s + 1024]}})
    stage(batch)
print(time.perf_counter() - start)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    rss = TreeRSS(proc.pid)
    out, _ = proc.communicate()
    rss.stop()
    return float(out.strip().splitlines()[-1]) / n_texts, rss.peak


def print_stages(stages: list[tuple[str, float, int, float]], total: float, n_docs: int, n_queries: int) -> None:
    """Per stage: seconds, the cost per query and per document (µs), its share of the stages'
    time, the cores it kept busy (CPU seconds of the process tree over wall seconds; sampled, so
    approximate, and "-" for a stage under half a second) and the peak RSS of the process tree
    while it ran."""
    gib = 1024 ** 3
    busy = sum(stage[1] for stage in stages) or 1.0
    print(f"{'stage':<18}{'seconds':>10}{'µs/query':>12}{'µs/doc':>10}{'share':>8}{'cores':>7}{'peak RSS GiB':>14}")
    for name, seconds, peak, cpu in stages:
        # Sampled every 50 ms: under half a second the ratio says nothing.
        cores = f"{cpu / seconds:.2f}" if seconds >= 0.5 else "-"
        print(f"{name:<18}{seconds:>10.1f}{seconds / n_queries * 1e6:>12.0f}{seconds / n_docs * 1e6:>10.1f}"
              f"{seconds / busy:>8.1%}{cores:>7}{peak / gib:>14.2f}")
    peak = max((stage[2] for stage in stages), default=0)
    print(f"{'total':<18}{total:>10.1f}{total / n_queries * 1e6:>12.0f}{total / n_docs * 1e6:>10.1f}"
          f"{'':>15}{peak / gib:>14.2f}   (total: the whole command, process start included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k documents only (CI)")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--query-ratio", type=float, default=0.1)
    parser.add_argument("--runner", default="local")
    parser.add_argument("--embed", default="", help="comma-separated text counts to time embedding on, e.g. 10000,50000")
    opts = parser.parse_args()
    sizes = [10_000] if opts.quick else [int(s) for s in opts.sizes.split(",") if s.strip()]
    gib = 1024 ** 3
    rows = []
    for n_docs in sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"hardneg-scale-{n_docs}-"))
        try:
            t = time.perf_counter()
            inputs = make_inputs(folder, n_docs, max(1, int(n_docs * opts.query_ratio)))
            generate = time.perf_counter() - t
            load_before = os.getloadavg()
            stages, total = mine(inputs, folder, opts.runner)
            load_after = os.getloadavg()
            recall, description = recall_at_100(folder, inputs)
            rows.append((n_docs, stages, total, recall, description))
            print(f"\n{n_docs:,} documents x {int(n_docs * opts.query_ratio):,} queries (inputs generated in {generate:.0f}s); "
                  f"index: {description}")
            print_stages(stages, total, n_docs, max(1, int(n_docs * opts.query_ratio)))
            print(f"recall@100 {recall:.3f}")
            # Other processes sharing the cores stretch every figure above: the load says how much.
            print("load average (1, 5, 15 min) before the run: " + ", ".join(f"{x:.2f}" for x in load_before)
                  + "; after: " + ", ".join(f"{x:.2f}" for x in load_after))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if opts.embed:
        print(f"\n{'texts':>8}{'ms/text':>10}{'peak RSS GiB':>14}")
        for n in [int(x) for x in opts.embed.split(",")]:
            per_text, peak = embed_cost(n)
            print(f"{n:>8}{per_text * 1000:>10.2f}{peak / gib:>14.2f}")


if __name__ == "__main__":
    main()
