"""False negatives at equal hardness: every configuration placed against the anchor's whole curve.

The anchor is hardneg's sentence-transformers-equivalent setting (dense only, `filters: []`, top
sampling; it agrees 100% with `mine_hard_negatives`, benchmarks/vs_sentence_transformers.py),
swept over `range_min` in {0, 5, 10, 20, 30, 50}: each point is (mean dense rank of the
negatives, fn_rate). A configuration's "ratio" is its fn_rate divided by the anchor's fn_rate at
the configuration's own mean rank (linear interpolation between the two neighbouring points of
the curve; outside the curve the nearest end point is used and the row is marked). Comparing at
equal *mean* rank, not median, is deliberate: a median hides a tail of deep, easy negatives.

Every run mines with `--positives best --hide-extra-positives --num-negatives 5` (the other judged
documents stay in the pool, so false negatives can be counted) and `runner: local`, in one work
dir per collection (`--work-dir ROOT`: ROOT/<collection folder name>), so embeddings and
candidates are computed once and every further run only filters, samples and writes.

Figures are given on every query subset:
* `all`: every judged query (or those listed in `--queries FILE`);
* `half A`, `half B`: a stable split by a hash of the query id (`hardneg.pipeline.outputs.evaluate.query_half`:
  the first byte of sha256(id) even -> A, odd -> B), so any collection splits the same way;
* `dense`: the queries with at least `--min-relevant` (10) judged-relevant documents, where many
  near neighbours of a query are relevant; with several `--beir`, also pooled over them (the
  anchor's curve pooled over the same queries).

    python benchmarks/fn_curve.py --beir examples/cranfield --beir examples/cacm \\
        [--config a.yaml ...] [--queries FILE] [--min-relevant 10] [--work-dir ROOT] [--json F] [--png F]

hardneg's defaults are always measured, first; each `--config` adds one configuration. A YAML config is a
mapping of hardneg config keys (as `hardneg mine --config`), named by its file stem; the keys the
benchmark fixes (inputs, outputs, positives, num_negatives, runner) are overridden.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RANGE_MINS = (0, 5, 10, 20, 30, 50)
NUM_NEGATIVES = 5
DEFAULTS = "hardneg defaults"
# The anchor: sentence-transformers' mine_hard_negatives settings, spelled out so that a change of
# hardneg's defaults never moves it.
ANCHOR = {"miners": ["dense"], "filters": [], "sampling_strategy": "top", "score": "dense", "quotas": None,
          "max_score": None, "min_score": None, "absolute_margin": None, "relative_margin": None,
          "range_max": 100, "false_negatives": "drop"}
# Keys every run has: what lets false negatives be counted and runs share their cache.
FIXED = {"positives": "best", "hide_extra_positives": True, "num_negatives": NUM_NEGATIVES, "runner": "local",
         "format": "n-tuple", "metadata_columns": True}


def mine_and_load(beir: Path, work: Path, overrides: dict[str, Any]):
    """Mine one configuration into the shared work dir (cached by fingerprint) and load it for
    eval. The output folder is named by a hash of the configuration."""
    from hardneg.pipeline.outputs import evaluate as ev
    from hardneg.pipeline.config import MineConfig
    from hardneg.pipeline.runner import Pipeline

    out, cache = run_dir(work, overrides), work / "cache"
    Pipeline(MineConfig(beir=beir, out=out, work_dir=cache, **{**overrides, **FIXED}), progress=False).run()
    return ev.load(beir, out, work_dir=cache)


def run_dir(work: Path, overrides: dict[str, Any]) -> Path:
    """Where one configuration's output lives in a collection's work dir: named by a hash of the
    configuration, beside the stage cache (an output may not sit inside a work dir)."""
    keys = {**overrides, **FIXED}
    return work / "runs" / hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def query_sets(beir: Path, qrels: dict[str, dict[str, float]], only: set[str] | None, min_relevant: int) -> dict[str, set[str]]:
    from hardneg.pipeline.outputs.evaluate import query_half

    judged = {q for q, docs in qrels.items() if docs and (only is None or q in only)}
    return {
        "all": judged,
        "half A": {q for q in judged if query_half(q) == 0},
        "half B": {q for q in judged if query_half(q) == 1},
        "dense": {q for q in judged if len(qrels[q]) >= min_relevant},
    }


def point(loaded_list: list, ids_list: list[set[str]]) -> dict[str, Any]:
    """fn_rate, rank figures and coverage of one configuration over (collection, queries) parts,
    pooled: counts are summed and ranks concatenated, so every negative weighs the same."""
    from hardneg.pipeline.outputs.evaluate import rank_figures

    negatives = fn = judged = covered = 0
    ranks: list[int] = []
    extra: set[tuple[str, str, str]] = set()
    for part, (loaded, ids) in enumerate(zip(loaded_list, ids_list)):
        for g in loaded.groups:
            if g["query_id"] not in ids:
                continue
            relevant = loaded.qrels.get(g["query_id"], {})
            extra.update((str(part), g["query_id"], d) for d in g.get("extra_positive_ids") or [])
            negatives += len(g["negative_ids"])
            fn += sum(d in relevant for d in g["negative_ids"])
            ranks += [loaded.rank_of[(g["query_id"], d)] for d in g["negative_ids"] if (g["query_id"], d) in loaded.rank_of]
        full = {g["query_id"] for g in loaded.groups if g["query_id"] in ids and len(g["negative_ids"]) >= loaded.k}
        judged += len(ids)
        covered += len(full)
    relabelled = sum(d in loaded_list[int(p)].qrels.get(q, {}) for p, q, d in extra)
    return {"queries": judged, "negatives": negatives, "false_negatives": fn,
            "fn_rate": fn / negatives if negatives else None, **rank_figures(ranks),
            "coverage": covered / judged if judged else None,
            "extra_positives": len(extra), "relabel_precision": relabelled / len(extra) if extra else None}


def anchor_fn_at(curve: list[dict[str, Any]], mean_rank: float) -> tuple[float, bool]:
    """The anchor's fn_rate at `mean_rank` by linear interpolation on its curve, and whether
    `mean_rank` lies inside the curve (outside, the nearest end point's fn_rate)."""
    pts = sorted((p["mean_rank"], p["fn_rate"]) for p in curve if p["mean_rank"] is not None)
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    return float(np.interp(mean_rank, xs, ys)), xs[0] <= mean_rank <= xs[-1]


def place(figures: dict[str, Any], curve: list[dict[str, Any]]) -> dict[str, Any]:
    if figures["mean_rank"] is None or figures["fn_rate"] is None:
        return {**figures, "anchor_fn_rate": None, "ratio": None, "inside_curve": False}
    anchor, inside = anchor_fn_at(curve, figures["mean_rank"])
    ratio = figures["fn_rate"] / anchor if anchor > 0 else (0.0 if figures["fn_rate"] == 0 else float("inf"))
    return {**figures, "anchor_fn_rate": anchor, "ratio": ratio, "inside_curve": inside}


def measure(beirs: list[Path], configs: dict[str, dict[str, Any]], work_root: Path, *, only: set[str] | None = None,
            min_relevant: int = 10) -> dict[str, Any]:
    """Every figure of the benchmark as one dict (what --json writes): per part (a collection's
    subset, or `pooled dense`), the anchor's curve and each configuration placed against it."""
    runs: dict[str, dict[str, Any]] = {}
    sets: dict[str, dict[str, set[str]]] = {}
    for beir in beirs:
        work = work_root / beir.resolve().name
        anchor = {r: mine_and_load(beir, work, {**ANCHOR, "range_min": r}) for r in RANGE_MINS}
        mined = {name: mine_and_load(beir, work, keys) for name, keys in configs.items()}
        runs[beir.resolve().name] = {"anchor": anchor, "configs": mined}
        sets[beir.resolve().name] = query_sets(beir, next(iter(anchor.values())).qrels, only, min_relevant)
    parts: dict[str, list[tuple[str, str]]] = {f"{c} / {s}": [(c, s)] for c in sets for s in sets[c]}
    if len(sets) > 1:
        parts["pooled / dense"] = [(c, "dense") for c in sets]
    result: dict[str, Any] = {"range_mins": list(RANGE_MINS), "min_relevant": min_relevant, "parts": {}}
    for part, members in parts.items():
        ids = [sets[c][s] for c, s in members]
        curve = [{"range_min": r, **point([runs[c]["anchor"][r] for c, _ in members], ids)} for r in RANGE_MINS]
        placed = {name: place(point([runs[c]["configs"][name] for c, _ in members], ids), curve) for name in configs}
        result["parts"][part] = {"anchor": curve, "configs": placed}
    return result


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    for part, data in result["parts"].items():
        n = data["anchor"][0]["queries"]
        print(f"\n{part} ({n} queries)")
        print(f"  {'setting':<34}{'fn_rate':>8}{'mean':>7}{'median':>7}{'p90':>6}{'cover':>7}{'anchor@mean':>12}{'ratio':>7}")
        for p in data["anchor"]:
            print(f"  {'anchor range_min=' + str(p['range_min']):<34}{pct(p['fn_rate']):>8}{num(p['mean_rank']):>7}"
                  f"{num(p['median_rank']):>7}{num(p['p90_rank'], '.0f'):>6}{pct(p['coverage']):>7}")
        for name, p in data["configs"].items():
            mark = "" if p["inside_curve"] else " *"
            relabel = f"  relabelled {p['extra_positives']}, precision {pct(p['relabel_precision'])}" if p["extra_positives"] else ""
            print(f"  {name[:34]:<34}{pct(p['fn_rate']):>8}{num(p['mean_rank']):>7}{num(p['median_rank']):>7}"
                  f"{num(p['p90_rank'], '.0f'):>6}{pct(p['coverage']):>7}{pct(p['anchor_fn_rate']):>12}"
                  f"{num(p['ratio'], '.2f') + 'x':>7}{mark}{relabel}")
    print("\nratio: fn_rate / the anchor's fn_rate at the same mean rank (* = outside the anchor's curve: nearest end)")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(result["parts"])
    cols = min(4, len(parts))
    rows = (len(parts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, part in zip(axes.flat, parts):
        data = result["parts"][part]
        xs = [p["mean_rank"] for p in data["anchor"]]
        ys = [100 * p["fn_rate"] for p in data["anchor"]]
        ax.plot(xs, ys, "o-", color="gray", label="anchor (range_min sweep)")
        for p, x, y in zip(data["anchor"], xs, ys):
            ax.annotate(str(p["range_min"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color="gray")
        for name, p in data["configs"].items():
            if p["mean_rank"] is not None:
                ax.plot([p["mean_rank"]], [100 * p["fn_rate"]], "*", markersize=11,
                        label=f"{name} ({num(p['ratio'], '.2f')}x)")
        ax.set_title(f"{part} ({data['anchor'][0]['queries']} q)", fontsize=9)
        ax.set_xlabel("mean dense rank of the negatives", fontsize=8)
        ax.set_ylabel("fn_rate (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(parts):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def read_configs(paths: list[Path]) -> dict[str, dict[str, Any]]:
    import yaml

    configs: dict[str, dict[str, Any]] = {DEFAULTS: {}}
    for path in paths:
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"fn_curve: {path}: expected a mapping of config keys")
        configs[path.stem] = data
    return configs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beir", type=Path, action="append", required=True, help="BEIR folder (repeat for several)")
    parser.add_argument("--config", type=Path, action="append", default=[], help="YAML of config keys (repeat)")
    parser.add_argument("--queries", type=Path, help="only the query ids listed in FILE (one a line)")
    parser.add_argument("--min-relevant", type=int, default=10, help="judged-relevant documents of a 'dense' query")
    parser.add_argument("--work-dir", type=Path, help="cache root, one folder per collection (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--png", type=Path, help="plot the curves here")
    opts = parser.parse_args(argv)
    logging.getLogger("hardneg").setLevel(logging.WARNING)
    only = set(opts.queries.read_text().split()) if opts.queries else None
    work_root = opts.work_dir or Path(tempfile.mkdtemp(prefix="hardneg-fn-curve-"))
    result = measure(opts.beir, read_configs(opts.config), work_root, only=only, min_relevant=opts.min_relevant)
    print_table(result)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(result, indent=1))
    if opts.png:
        plot(result, opts.png)
    return result


if __name__ == "__main__":
    main()
