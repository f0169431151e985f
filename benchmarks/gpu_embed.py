"""Embedding throughput on a GPU (fp16) against the same machine's CPU (fp32), through hardneg's
own EmbedStage, plus agreement of the vectors. Run on a machine with CUDA:

    python benchmarks/gpu_embed.py MODEL_DIR [--texts 100000]

MODEL_DIR: a sentence-transformers folder (all-MiniLM-L6-v2 by default when installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def texts_of(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(100_000)], dtype=object)
    p = 1.0 / np.arange(1, 100_001)
    return [" ".join(row) for row in words[rng.choice(100_000, size=(n, 10), p=p / p.sum())]]


def embed(stage, texts: list[str], batch: int = 4096) -> tuple[np.ndarray, float]:
    stage.ensure_setup()
    stage.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    out = [stage.encode(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    if stage.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return np.concatenate(out), time.perf_counter() - start


def main() -> None:
    from hardneg.stages.embed import EmbedStage

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--cpu-texts", type=int, default=2_000)
    opts = parser.parse_args()
    import torch

    docs = [(json.loads(l).get("title", "") + " " + json.loads(l)["text"]).strip()
            for l in open(ROOT / "examples" / "cranfield" / "corpus.jsonl")]
    short = texts_of(opts.texts)
    gpu = EmbedStage(model=opts.model, id_column="id", text_column="text", device="cuda", precision="fp16",
                     micro_batch_size=256)
    cpu = EmbedStage(model=opts.model, id_column="id", text_column="text", device="cpu", precision="fp32",
                     threads=os.cpu_count())
    print(f"GPU: {torch.cuda.get_device_name(0)}; CPU threads: {os.cpu_count()}; torch {torch.__version__}")
    rows = []
    for name, texts, cpu_n in (("Cranfield abstracts", docs, 400), ("short synthetic texts", short, opts.cpu_texts)):
        g, g_s = embed(gpu, texts)
        c, c_s = embed(cpu, texts[:cpu_n])
        cos = (g[:cpu_n] * c).sum(axis=1)
        rows.append((name, len(texts), len(texts) / g_s, cpu_n / c_s, float(cos.min()), float(cos.mean())))
    # Batch independence on the GPU: a text's vector alone vs among others.
    alone = np.concatenate([gpu.encode([t]) for t in docs[:50]])
    together = gpu.encode(docs[:50] + docs[100:300])[:50]
    print(f"{'texts':<24}{'n':>8}{'GPU fp16 /s':>13}{'CPU fp32 /s':>13}{'x':>8}{'cos min':>10}{'cos mean':>10}")
    for name, n, gps, cps, cmin, cmean in rows:
        print(f"{name:<24}{n:>8}{gps:>13.1f}{cps:>13.1f}{gps / cps:>8.1f}{cmin:>10.5f}{cmean:>10.6f}")
    print(f"GPU vectors alone vs in a batch: identical={np.array_equal(alone, together)}, "
          f"max abs diff {np.abs(alone - together).max():.2e}")


if __name__ == "__main__":
    main()
