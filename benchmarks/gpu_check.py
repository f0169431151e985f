"""The GPU paths, checked on a machine with a CUDA GPU: the FAISS index built and searched on the
GPU against the CPU (time and recall@100 against exact search), the embedding stage on CUDA in
each precision against the CPU's fp32 vectors (cosine, run-to-run identity, texts per second), and
Cranfield mined end to end on the GPU against the same run on the CPU.

    python benchmarks/gpu_check.py --index-docs 1000000             # GPU half: faiss with GPU support
    python benchmarks/gpu_check.py --model DIR --embed-texts 100000  # needs torch with CUDA
    python benchmarks/gpu_check.py --model DIR --pipeline            # Cranfield mined on CPU and GPU

The index's CPU half runs anywhere (a test runs it, so the script works when a GPU is lent);
the GPU half and the embedding part say why they skipped where faiss or torch cannot use a GPU.
Figures go to benchmarks/RESULTS.md; the tests never need a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.scale import DIM, exact_top_k, mixture_vectors, recall  # noqa: E402


def check_index(n_docs: int, n_queries: int, k: int = 100) -> dict:
    """The index built and searched on the CPU, and on the GPU where faiss can use one."""
    import faiss

    from hardneg.stages.engines.faiss_index import AnnIndex, IndexConfig, build_index, gpu_status

    usable, why = gpu_status()
    modes = ("off", "on") if usable else ("off",)

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1000, DIM)).astype(np.float32)
    vectors = mixture_vectors(rng, centers, n_docs)
    queries = mixture_vectors(rng, centers, n_queries)
    truth = exact_top_k(vectors, queries, k)  # on the CPU: the reference for both halves
    out: dict = {"faiss": faiss.__version__, "gpus": faiss.get_num_gpus(), "docs": n_docs, "queries": n_queries}
    with tempfile.TemporaryDirectory() as tmp:
        for gpu in modes:
            cfg = IndexConfig(gpu=gpu)
            t0 = time.perf_counter()
            build_index(vectors, cfg, Path(tmp) / gpu)
            built = time.perf_counter() - t0
            index = AnnIndex.load(Path(tmp) / gpu, cfg)
            index.search(queries[:64], k)  # warm-up: the first GPU search pays for its kernels
            t0 = time.perf_counter()
            _, rows = index.search(queries, k)
            searched = time.perf_counter() - t0
            meta = json.loads((Path(tmp) / gpu / "index.json").read_text())
            out[f"gpu_{gpu}"] = {"built_on": meta.get("built_on"), "index": index.description,
                                 "build_s": round(built, 2), "search_s": round(searched, 3),
                                 "us_per_query": round(1e6 * searched / n_queries, 1),
                                 "recall@100": round(recall(rows, truth), 4)}
            # Each half as it finishes: a run cut short by a time limit keeps what it measured.
            print(f"index gpu={gpu}: {json.dumps(out[f'gpu_{gpu}'])}", file=sys.stderr, flush=True)
    if not usable:
        out["gpu_on"] = {"skipped": why}
        return out
    on, off = out["gpu_on"], out["gpu_off"]
    out["gpu_speedup"] = {"build": round(off["build_s"] / on["build_s"], 2),
                          "search": round(off["search_s"] / on["search_s"], 2)}
    return out


def corpus_texts() -> list[str]:
    with open(ROOT / "examples" / "cranfield" / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def embedder(model: str, device: str, precision: str, threads: int, micro_batch: int = 32):
    from hardneg.stages.embed import EmbedStage

    stage = EmbedStage(model=model, id_column="id", text_column="text", device=device,
                       precision=precision, threads=threads, micro_batch_size=micro_batch)
    stage.setup()
    return stage


def check_embed(model: str, n_texts: int, device: str = "cuda") -> None:
    """Prints each figure as soon as it is measured (a slow machine still shows the first)."""
    import torch

    from hardneg.stages.models import pick_device, pick_precision

    def report(key: str, value) -> None:
        print(json.dumps({key: value}), flush=True)

    if device == "cuda" and not torch.cuda.is_available():
        report("embed", {"skipped": "torch sees no CUDA device"})
        return

    texts = corpus_texts()
    report("setup", {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "torch": torch.__version__,
                     "auto": [pick_device("auto"), pick_precision("auto", "cuda")]})
    cpu_threads = max(1, min(16, os.cpu_count() or 1))
    cpu = embedder(model, "cpu", "fp32", cpu_threads)
    t0 = time.perf_counter()
    reference = cpu.encode(texts)
    report("cpu_reference_fp32", {"threads": cpu_threads, "texts_per_s": round(len(texts) / (time.perf_counter() - t0), 1)})
    # Distinct texts (the stage embeds a repeated text once): Cranfield's, each with a number.
    many = [f"{texts[i % len(texts)]} {i}" for i in range(n_texts)]
    shuffled = np.random.default_rng(0).permutation(len(texts))
    for precision in ("fp16", "fp32", "bf16"):
        stage = embedder(model, device, precision, 1)
        first = stage.encode(texts)
        again = stage.encode(texts)
        reordered = stage.encode([texts[i] for i in shuffled])
        cos = np.sum(first * reference, axis=1)
        t0 = time.perf_counter()
        stage.encode(many)
        seconds = time.perf_counter() - t0
        report(f"{device}_{precision}", {
            "cosine_to_cpu_fp32_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "same_twice": bool(np.array_equal(first, again)),
            "same_in_any_order": bool(np.array_equal(first[shuffled], reordered)),
            "texts_per_s": round(n_texts / seconds, 1)})
        del stage
    # The default embed_batch_size (32) against larger forward passes, where the GPU has room.
    for micro_batch in (128, 512):
        stage = embedder(model, device, "fp16" if device == "cuda" else "fp32", 1, micro_batch)
        t0 = time.perf_counter()
        stage.encode(many)
        report(f"texts_per_s_micro_batch_{micro_batch}", round(n_texts / (time.perf_counter() - t0), 1))
        del stage


def mine(model: str, out: Path, settings: list[str]) -> dict:
    """`hardneg mine` on Cranfield with `settings`; its negatives from the sample stage's output."""
    import subprocess

    from hardneg.stages.io import read_table

    args = [sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(ROOT / "examples" / "cranfield"),
            "--out", str(out / "out"), "--work-dir", str(out / "work"), "--model", model, "--miners", "dense,bm25"]
    for setting in settings:
        args += ["--set", setting]
    t0 = time.perf_counter()
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    sample = read_table(next((out / "work").glob("sample-*")), columns=["pair_id", "negative_ids"])
    candidates = read_table(next((out / "work").glob("candidates-*")), columns=["query_id", "candidate_ids"])
    log = run.stdout + run.stderr
    return {"rc": run.returncode, "seconds": round(seconds, 1), "error": log.strip().splitlines()[-1:] if run.returncode else [],
            "index_searched_on_gpu": "searches on gpu" in log,
            "negatives": dict(zip(sample.column("pair_id").to_pylist(), sample.column("negative_ids").to_pylist())),
            "candidates": dict(zip(candidates.column("query_id").to_pylist(), candidates.column("candidate_ids").to_pylist()))}


def check_pipeline(model: str, index_gpu: str = "auto") -> dict:
    """Cranfield mined three ways: all on the CPU in fp32, on the GPU in fp32, and with the
    defaults (device and index on the GPU, fp16); each GPU run against the CPU run."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    runs = {"cpu_fp32": ["device=cpu", "precision=fp32", "index.gpu=off"],
            "cuda_fp32": ["device=cuda", "precision=fp32", "index.gpu=" + index_gpu],
            "auto": ["index.gpu=" + index_gpu]}
    out, cpu = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in runs.items():
            run = mine(model, Path(tmp) / name, settings)
            cpu = cpu or run  # the first run, all on the CPU, is the reference
            same_negatives = np.mean([run["negatives"].get(k) == v for k, v in cpu["negatives"].items()])
            top100 = np.mean([len(set(run["candidates"].get(k) or []) & set(v)) / max(1, len(v))
                              for k, v in cpu["candidates"].items()])
            out[name] = {key: run[key] for key in ("rc", "seconds", "error", "index_searched_on_gpu")}
            out[name].update({"pairs_with_the_cpu_negatives": round(float(same_negatives), 4),
                              "candidates_shared_with_cpu": round(float(top100), 4)})
            # Each run as it finishes: a run cut short by a time limit keeps what it measured.
            print(f"pipeline {name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-docs", type=int, default=0, help="documents for the index check (0: skip)")
    parser.add_argument("--index-queries", type=int, default=10_000)
    parser.add_argument("--model", help="embedding model (path or name) for the embedding check")
    parser.add_argument("--embed-texts", type=int, default=100_000)
    parser.add_argument("--pipeline", action="store_true", help="with --model: mine Cranfield on the CPU and on the GPU")
    parser.add_argument("--pipeline-index-gpu", default="auto", choices=["auto", "on", "off"],
                        help="index.gpu of the pipeline's GPU runs (off: embedding on the GPU, the index on the CPU)")
    args = parser.parse_args()
    if args.index_docs:
        print(json.dumps({"index": check_index(args.index_docs, args.index_queries)}, indent=1), flush=True)
    if args.model and args.embed_texts:
        check_embed(args.model, args.embed_texts)
    if args.model and args.pipeline:
        print(json.dumps({"pipeline": check_pipeline(args.model, args.pipeline_index_gpu)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
