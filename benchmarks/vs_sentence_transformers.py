"""hardneg vs sentence-transformers' mine_hard_negatives on the Cranfield sample, in one run.

Same model (all-MiniLM-L6-v2), num_negatives=5, sampling_strategy="top", FAISS on, pairs = each
query with its best-graded document, only that positive masked (hardneg: --positives best
--hide-extra-positives). Prints wall times and ratios:

* sentence-transformers, cold (model loading included);
* hardneg cold: empty work dir, Ray start included (`hardneg mine` as a subprocess);
* hardneg warm: the same work dir, only a filter changed (relative_margin);
* agreement: share of identical negatives per pair when hardneg runs sentence-transformers'
  settings (dense only, range_min=0, no false-negative filters, top sampling).

    python benchmarks/vs_sentence_transformers.py [--runner ray|local] [--beir examples/cranfield]
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
        del model

        common = ["--beir", str(opts.beir), "--positives", "best", "--hide-extra-positives", "--num-negatives", "5",
                  "--runner", opts.runner, "--work-dir", str(work / "hn-work"), "--set", f"range_max={opts.range_max}",
                  "--set", "precision=fp32"]
        cold = hardneg([*common, "--out", str(work / "cold")])
        warm = hardneg([*common, "--out", str(work / "warm"), "--set", "relative_margin=0.05"])
        # Identical settings to sentence-transformers: dense only, no false-negative filters.
        same_settings = hardneg([*common, "--out", str(work / "same"), "--miners", "dense", "--set", "range_min=0",
                                 "--set", "filters=[]", "--set", "sampling_strategy=top"])

        ours = datasets.load_from_disk(str(work / "same"))
        st_rows = {row["query"]: {row[f"negative_{i}"] for i in range(1, 6)} for row in st}
        same = total = 0
        for row in ours:
            negatives = {row[f"negative_{i}"] for i in range(1, 6)}
            theirs = st_rows.get(row["query"], set())
            same += len(negatives & theirs)
            total += len(negatives)

        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, runner {opts.runner}")
        print(f"{'run':<44}{'seconds':>10}{'vs ST cold':>12}")
        print(f"{'sentence-transformers mine_hard_negatives':<44}{st_seconds:>10.1f}{1.0:>11.2f}x")
        print(f"{'hardneg mine, cold (empty cache, Ray start)':<44}{cold:>10.1f}{st_seconds / cold:>11.2f}x")
        print(f"{'hardneg mine, warm (relative_margin changed)':<44}{warm:>10.1f}{st_seconds / warm:>11.2f}x")
        print(f"{'hardneg mine, ST settings (cached embeddings)':<44}{same_settings:>10.1f}{st_seconds / same_settings:>11.2f}x")
        stages = json.loads((work / "cold" / "stats.json").read_text())["stages"]
        print("hardneg cold, seconds per stage: "
              + ", ".join(f"{name} {info['seconds']:.1f}" for name, info in stages.items() if not info["reused"]))
        print(f"agreement at identical settings: {same}/{total} negatives = {same / max(total, 1):.3f}")
        print(f"rows: sentence-transformers {len(st)}, hardneg {ours.num_rows}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
