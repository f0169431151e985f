"""hardneg vs sentence-transformers' mine_hard_negatives on the Cranfield sample, in one run.

Same model (all-MiniLM-L6-v2), num_negatives=5, sampling_strategy="top", FAISS on, pairs = each
query with its best-graded document, only that positive masked (hardneg: --positives best
--hide-extra-positives). Prints wall times and ratios:

* the CPU's features that decide the embedding precision (avx512_bf16, AMX, AVX2; torch's
  kernel level) and the precision hardneg picks on it;
* sentence-transformers, cold (model loading included);
* the floor: the model's plain `encode` of exactly the texts hardneg embeds (queries and corpus,
  with their prompts and max length), at the precision hardneg picks, in this process, model
  already loaded: what torch needs on this machine (hardneg's OpenVINO engine, picked on CPUs
  with native bf16, can go below it; its one-time conversion is timed and printed apart);
* the engine floor: hardneg's own embedding engine (`EmbedStage.encode`, OpenVINO where it is
  picked) on the same texts in this process: what is left of a cold run is the rest of the run;
* hardneg cold: empty work dir, Ray start included (`hardneg mine` as a subprocess), with the
  default runner (local Ray) and with `--runner local`, and their ratio; and with Ray workers
  asked for (`--set workers=1`: what Ray costs where the default would not start it);
* hardneg warm: the same work dir, only a filter changed (relative_margin);
* agreement: share of identical negatives per pair when hardneg runs sentence-transformers'
  settings (dense only, range_min=0, no false-negative filters, top sampling).

    python benchmarks/vs_sentence_transformers.py [--runner ray|local] [--beir examples/cranfield]

It takes minutes (the corpus is embedded four times: by sentence-transformers, for the floor,
and by hardneg cold with each runner); other work on the machine's cores slows every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hardneg(args: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hardneg.pipeline.cli", "mine", *args, "-q"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return time.perf_counter() - started


def cpu_features() -> str:
    import torch

    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).partition(":")[2].split())
    except (OSError, StopIteration):
        flags = set()
    model = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    have = {name: name in flags for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    return (f"cpu: {model}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())
            + f"; torch kernels {torch.backends.cpu.get_cpu_capability()}")


def floor_seconds(model, precision: str, queries: list[str], corpus: list[str], config) -> float:
    """The model's own `encode` of the texts hardneg embeds, at hardneg's precision."""
    import contextlib

    import torch

    model.max_seq_length = config.max_seq_length or model.max_seq_length
    queries = [(config.query_prompt or "") + q for q in queries]
    corpus = [(config.corpus_prompt or "") + d for d in corpus]
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    started = time.perf_counter()
    with torch.inference_mode(), autocast:
        model.encode(queries, batch_size=config.embed_batch_size, normalize_embeddings=True)
        model.encode(corpus, batch_size=config.embed_batch_size, normalize_embeddings=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beir", type=Path, default=ROOT / "examples" / "cranfield")
    parser.add_argument("--runner", default="ray")
    parser.add_argument("--range-max", type=int, default=100)
    opts = parser.parse_args()

    import datasets
    import torch

    from hardneg.pipeline.config import MineConfig
    from hardneg.stages.ingest import IngestStage
    from hardneg.stages.io import read_table

    work = Path(tempfile.mkdtemp(prefix="hardneg-bench-"))
    try:
        # The inputs both tools see: hardneg's own ingest of the BEIR folder.
        ingest_dir = work / "ingest"
        ingest_dir.mkdir()
        IngestStage(MineConfig(beir=opts.beir, out=work / "x", positives="best", hide_extra_positives=True)).run({}, ingest_dir)
        corpus = read_table(ingest_dir / "corpus")
        texts = dict(zip(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist()))
        queries = read_table(ingest_dir / "queries").to_pylist()
        pairs = datasets.Dataset.from_dict({"query": [q["text"] for q in queries],
                                            "positive": [texts[q["positive_ids"][0]] for q in queries]})

        # --- sentence-transformers, cold: model loading included
        started = time.perf_counter()
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.util import mine_hard_negatives

        from hardneg.stages.models import resolve_model

        model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
        st = mine_hard_negatives(pairs, model, corpus=list(texts.values()), num_negatives=5, sampling_strategy="top",
                                 range_max=opts.range_max, use_faiss=True, output_format="n-tuple", verbose=False)
        st_seconds = time.perf_counter() - started

        # --- the floor: exactly hardneg's texts (its ingest), at the precision it picks here
        from hardneg.stages.models import pick_precision

        config = MineConfig(beir=opts.beir, out=work / "x")
        precision = pick_precision(config.precision, "cpu")
        floor = floor_seconds(model, precision, [q["text"] for q in queries], list(texts.values()), config)
        del model

        # The engine hardneg picks here. OpenVINO converts the model once per machine (kept in
        # HARDNEG_CACHE): timed on its own into a fresh cache, which the runs below then share.
        from hardneg.stages.embed import EmbedStage, default_threads
        from hardneg.stages.models import pick_backend

        backend = pick_backend(config.embed_backend, "cpu", precision)
        os.environ["HARDNEG_CACHE"] = str(work / "hardneg-cache")
        started = time.perf_counter()
        engine = EmbedStage(model=config.model, id_column="id", text_column="text", precision=precision,
                            backend=backend, micro_batch_size=config.embed_batch_size, threads=default_threads())
        engine.ensure_setup()
        conversion = time.perf_counter() - started
        # The engine's floor: hardneg's own engine embedding the same texts in this process.
        query_engine = EmbedStage(model=config.model, id_column="id", text_column="text", precision=precision,
                                  backend=backend, micro_batch_size=config.embed_batch_size, prompt=config.query_prompt,
                                  threads=default_threads())
        engine.prompt = config.corpus_prompt
        started = time.perf_counter()
        query_engine.ensure_setup()
        query_engine.encode([q["text"] for q in queries])
        engine.encode(list(texts.values()))
        engine_floor = time.perf_counter() - started

        # Figures are printed as they are measured: a run cut short still shows what it had.
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, runner {opts.runner}", flush=True)
        print(cpu_features() + f"; hardneg precision {precision}, engine {backend}", flush=True)
        if backend == "openvino":
            print(f"one-time OpenVINO conversion of the model (cached per machine, not in the runs below): {conversion:.1f} s")
        print(f"{'run':<44}{'seconds':>10}{'vs ST cold':>12}")

        def row(name: str, seconds: float) -> None:
            print(f"{name:<44}{seconds:>10.1f}{st_seconds / seconds:>11.2f}x", flush=True)

        row("sentence-transformers mine_hard_negatives", st_seconds)
        row("floor: model.encode of hardneg texts", floor)
        row(f"engine floor: hardneg's {backend} encode, same texts", engine_floor)
        base = ["--beir", str(opts.beir), "--positives", "best", "--hide-extra-positives", "--num-negatives", "5",
                "--set", f"range_max={opts.range_max}"]
        common = [*base, "--runner", opts.runner, "--work-dir", str(work / "hn-work")]
        other = "local" if opts.runner == "ray" else "ray"
        cold_other = hardneg([*base, "--runner", other, "--work-dir", str(work / "hn-work-other"), "--out", str(work / "cold-other")])
        row(f"hardneg mine, cold, runner {other}", cold_other)
        cold = hardneg([*common, "--out", str(work / "cold")])
        row(f"hardneg mine, cold, runner {opts.runner}", cold)
        for label, folder in ((other, "cold-other"), (opts.runner, "cold")):
            stages = json.loads((work / folder / "stats.json").read_text())["stages"]
            print(f"hardneg cold ({label}), seconds per stage: "
                  + ", ".join(f"{name} {info['seconds']:.1f}" for name, info in stages.items() if not info["reused"]))
        ray_s, local_s = (cold, cold_other) if opts.runner == "ray" else (cold_other, cold)
        print(f"default runner (ray) / --runner local, cold: {ray_s / local_s:.3f} (target <= 1.15)")
        # What Ray costs where it does start workers (on a machine with room for one worker per
        # model the default run computes in the driver and never starts Ray: RESULTS.md).
        forced = hardneg([*base, "--runner", "ray", "--set", "workers=1", "--work-dir", str(work / "hn-work-forced"),
                          "--out", str(work / "cold-forced")])
        row("hardneg mine, cold, ray with workers=1", forced)
        print(f"ray with workers=1 / --runner local, cold: {forced / local_s:.3f}")
        print(f"hardneg cold ({opts.runner}) / floor: {cold / floor:.3f} (target <= 1.3); "
              f"/ engine floor: {cold / engine_floor:.3f}; --runner local / floor: {local_s / floor:.3f}", flush=True)
        warm = hardneg([*common, "--out", str(work / "warm"), "--set", "relative_margin=0.05"])
        row("hardneg mine, warm (relative_margin changed)", warm)
        # Identical settings to sentence-transformers: dense only, no false-negative filters.
        same_settings = hardneg([*common, "--out", str(work / "same"), "--miners", "dense", "--set", "range_min=0",
                                 "--set", "filters=[]", "--set", "sampling_strategy=top"])
        row("hardneg mine, ST settings (cached embeddings)", same_settings)

        ours = datasets.load_from_disk(str(work / "same"))
        st_rows = {r["query"]: {r[f"negative_{i}"] for i in range(1, 6)} for r in st}
        same = total = 0
        for record in ours:
            negatives = {record[f"negative_{i}"] for i in range(1, 6)}
            theirs = st_rows.get(record["query"], set())
            same += len(negatives & theirs)
            total += len(negatives)
        print(f"agreement at identical settings: {same}/{total} negatives = {same / max(total, 1):.3f}")
        print(f"rows: sentence-transformers {len(st)}, hardneg {ours.num_rows}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
