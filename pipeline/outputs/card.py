"""The dataset card (`README.md`) of a `--layout hub` output, and `--push-to-hub`.

The card's YAML front matter is what the Hugging Face Hub and `datasets.load_dataset(OUT)` read:
`configs` points the default config's train split at `data/*.parquet` (so `rejects/` is never
mistaken for data), `dataset_info` holds the features (from the Parquet's Arrow schema) and the
split sizes. The body records how the data was mined: the config, the models and their
fingerprints, the statistics and, when an evaluation ran, its table.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("hardneg")

DATA_GLOB = "data/*.parquet"
TAGS = ["hard-negatives", "sentence-transformers", "hardneg"]
TASK_CATEGORIES = ["sentence-similarity", "text-retrieval"]
_TEXT_COLUMNS = {"query", "positive", "negative", "passage", "label", "passages", "labels"}

# Keys that say where and how a run executed, not what it produced: left out of the card so
# a re-run on another machine (which reuses the output) never disagrees with it.
_EXECUTION_KEYS = {"out", "work_dir", "runner", "ray_address", "workers", "threads", "device"}
# Input paths appear by their last component only: a card is published, local paths are not.
_PATH_KEYS = {"beir", "pairs", "corpus", "corpus_embeddings"}

_SIZE_CATEGORIES = [
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"),
]


def size_category(rows: int) -> str:
    """The Hub's size_categories bucket for a row count."""
    for limit, name in _SIZE_CATEGORIES:
        if rows < limit:
            return name
    return "n>1T"


def card_config(config: Any) -> dict[str, Any]:
    """The mining config as it goes into the card: data-relevant keys only, input paths by name."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    out = {}
    for key, value in data.items():
        if key in _EXECUTION_KEYS:
            continue
        if key in _PATH_KEYS and value is not None:
            value = Path(value).name
        if key in ("model", "cross_encoder") and value is not None:
            value = public_model_name(value)
        out[key] = value
    return out


def public_model_name(name: str) -> str:
    """A hub id as is; a local model folder by its name (its identity is the content hash)."""
    path = Path(name)
    if path.is_absolute() or name.startswith((".", "~")) or path.is_dir():
        return path.name
    return name


def model_rows(config: Any) -> list[dict[str, str]]:
    """Each model the run used, with the identity hardneg fingerprints it by (hub revision or a
    content hash of the local files)."""
    from hardneg.stages.models import model_fingerprint

    rows = []
    for role, name in (("bi-encoder", getattr(config, "model", None)), ("cross-encoder", getattr(config, "cross_encoder", None))):
        if not name:
            continue
        try:
            identity = model_fingerprint(name)
        except Exception:  # noqa: BLE001 - an unidentifiable model still gets its row
            identity = {"model": name}
        if "revision" in identity:
            ident = f"revision `{identity['revision']}`"
        elif "content" in identity:
            ident = f"content `{identity['content']}`"
        else:
            ident = "unknown"
        rows.append({"role": role, "model": public_model_name(str(name)), "identity": ident})
    return rows


def front_matter(features_yaml: dict[str, Any], rows: int, num_bytes: int | None = None) -> dict[str, Any]:
    info = dict(features_yaml)
    splits = info.get("splits") or [{"name": "train", "num_examples": rows}]
    if num_bytes is not None:
        for split in splits:
            split.setdefault("num_bytes", num_bytes)
    info["splits"] = splits
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_GLOB}]}],
        "dataset_info": info,
        "size_categories": [size_category(rows)],
        "task_categories": list(TASK_CATEGORIES),
        "tags": list(TAGS),
    }


def _features_yaml(data_dir: Path) -> tuple[dict[str, Any], int, int]:
    """dataset_info (features + splits) from the Parquet files' schema and row counts."""
    import datasets
    import pyarrow.parquet as pq

    files = sorted(data_dir.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {data_dir}")
    schema = pq.read_schema(files[0])
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    size = sum(f.stat().st_size for f in files)
    features = datasets.Features.from_arrow_schema(schema)
    info = datasets.DatasetInfo(
        features=features,
        splits=datasets.SplitDict({"train": datasets.SplitInfo("train", num_bytes=size, num_examples=rows)}),
    )
    return info._to_yaml_dict(), rows, size


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]], numeric: bool = True) -> str:
    """A Markdown table; with `numeric`, every column but the first is right-aligned."""
    align = ["---" if i == 0 or not numeric else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def statistics_markdown(stats: dict[str, Any]) -> str:
    parts = []
    rejected = sum((stats.get("rejected_pairs") or {}).values())
    parts.append(_table(["", "pairs"], [
        ["input", stats.get("input_pairs")], ["written", stats.get("output_pairs")], ["rejected", rejected],
        ["short of negatives", stats.get("pairs_short_of_negatives", 0)], ["output rows", stats.get("output_rows")],
    ]))
    columns = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    scores = stats.get("scores") or {}
    score_rows = [[name, *[scores.get(name, {}).get(c) for c in columns]] for name in ("positive", "negative") if name in scores]
    for source, values in (stats.get("scores_per_source") or {}).items():
        score_rows.append([f"negative ({source})", *[values.get(c) for c in columns]])
    if score_rows:
        parts.append("Scores (the filter score):\n\n" + _table(["", *columns], score_rows))
    decisions = stats.get("decisions") or {}
    if decisions:
        per_source = stats.get("decisions_per_source") or {}
        sources = sorted(per_source)
        parts.append("Candidates by filter decision:\n\n" + _table(
            ["decision", "count", *sources],
            [[d, n, *[per_source[s].get(d, 0) for s in sources]] for d, n in decisions.items()],
        ))
    rejects = stats.get("rejects") or {}
    if rejects:
        parts.append("Rejects by reason (in `rejects/`, not part of the dataset):\n\n"
                     + _table(["reason", "count"], [[r, n] for r, n in sorted(rejects.items())]))
    return "\n\n".join(parts)


def eval_tables(result: Any) -> list[tuple[str, list[str], list[list[Any]]]]:
    """`pipeline.evaluate.evaluate`'s result as (title, header, rows) tables; an unknown shape
    becomes one metric/value table."""
    if not result:
        return []
    if isinstance(result, dict) and "fn_rate" in result and "negatives" in result:
        covered = f"{result.get('covered_queries', '-')}/{result.get('judged_queries', '-')}"
        tables = [("False negatives, hardness, coverage", ["negatives", "false negatives", "fn_rate", "median rank", "mean rank", "covered queries", "coverage"],
                   [[result.get("negatives"), result.get("false_negatives"), result.get("fn_rate"), result.get("median_rank"),
                     result.get("mean_rank"), covered, result.get("coverage")]])]
        per_source = result.get("per_source") or {}
        if per_source:
            tables.append(("Per source", ["source", "negatives", "false negatives", "fn_rate", "median rank", "mean rank"],
                           [[s, f.get("negatives"), f.get("false_negatives"), f.get("fn_rate"), f.get("median_rank"), f.get("mean_rank")]
                            for s, f in per_source.items()]))
        per_filter = result.get("per_filter") or {}
        if per_filter:
            tables.append(("Per filter decision", ["decision", "candidates", "judged relevant"],
                           [[d, f.get("candidates"), f.get("judged_relevant")] for d, f in per_filter.items()]))
        return [_drop_empty_columns(t) for t in tables]
    if isinstance(result, dict):
        return [("Evaluation", ["metric", "value"], [[k, v] for k, v in _flatten(result)])]
    return []


def _drop_empty_columns(table: tuple[str, list[str], list[list[Any]]]) -> tuple[str, list[str], list[list[Any]]]:
    title, header, rows = table
    keep = [i for i in range(len(header)) if i == 0 or any(row[i] is not None for row in rows)]
    return title, [header[i] for i in keep], [[row[i] for i in keep] for row in rows]


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out = []
        for key, inner in value.items():
            out += _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, list):
        return [(prefix, ", ".join(map(str, value)) if len(value) <= 12 else f"({len(value)} items)")]
    return [(prefix, value)]


def eval_markdown(result: Any) -> str | None:
    tables = eval_tables(result)
    if not tables:
        return None
    return "\n\n".join(f"{title}:\n\n" + _table(header, rows) for title, header, rows in tables)


def card_eval(out_dir: Path, config: Any) -> dict[str, Any] | None:
    """The evaluation against the run's own qrels (BEIR input only), without the model-based
    hardness ranks (those need the work dir the run holds: `hardneg eval` adds them). None when
    there are no qrels, no evaluator, or it fails (a card never fails a run)."""
    beir = getattr(config, "beir", None)
    if beir is None:
        return None
    try:
        from hardneg.pipeline.outputs.evaluate import evaluate
    except ImportError:
        return None
    try:
        return evaluate(Path(beir), Path(out_dir), split=getattr(config, "split", None), ranks=False)
    except Exception as err:  # noqa: BLE001
        log.warning("dataset card: evaluation skipped (%s: %s)", type(err).__name__, err)
        return None


def render_card(config: Any, stats: dict[str, Any], features_yaml: dict[str, Any], rows: int,
                num_bytes: int | None = None, eval_results: Any = None, title: str | None = None) -> str:
    meta = front_matter(features_yaml, rows, num_bytes)
    cfg = card_config(config)
    k = cfg.get("num_negatives")
    fmt = cfg.get("format")
    source = cfg.get("beir") or cfg.get("pairs") or "the input pairs"
    title = title or f"Hard negatives mined from {source}"
    models = model_rows(config)
    names = [f["name"] for f in features_yaml.get("features", [])]
    text_columns = [n for n in names if n in _TEXT_COLUMNS or re.fullmatch(r"negative_\d+", n)]
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {title}", "",
        f"(query, positive, hard negatives) data in the sentence-transformers `{fmt}` format, "
        f"{k} negatives per pair, mined with hardneg from `{source}`.", "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("THIS_REPO_OR_FOLDER", split="train")',
        f'train = ds.select_columns({text_columns!r})  # the text columns, for training',
        "```", "",
        "## Models", "",
        _table(["role", "model", "identity"], [[m["role"], f"`{m['model']}`", m["identity"]] for m in models], numeric=False) if models else "none",
        "",
        "## Statistics", "",
        statistics_markdown(stats), "",
    ]
    table = eval_markdown(eval_results)
    lines += ["## Evaluation", ""]
    if table:
        lines += ["Against the input's relevance judgements (`fn_rate`: share of negatives judged relevant; "
                  "`coverage`: share of judged queries with a full set of negatives; ranks: `hardneg eval`):", "",
                  table, ""]
    else:
        lines += ["No evaluation: the input had no relevance judgements.", ""]
    lines += [
        "## Mining config", "",
        "Re-run with `hardneg mine --config hardneg.yaml` (input paths shortened to their names):", "",
        "```yaml", yaml.safe_dump(cfg, sort_keys=True, allow_unicode=True).rstrip(), "```", "",
    ]
    return "\n".join(lines)


def write_card(out_dir: Path, config: Any, stats: dict[str, Any], eval_results: Any = None) -> Path:
    """Write `README.md` (the dataset card) into a hub-layout output folder (its `data/` and
    `stats.json` written). `eval_results` defaults to `card_eval`'s."""
    out_dir = Path(out_dir)
    if eval_results is None:
        eval_results = card_eval(out_dir, config)
    features_yaml, rows, size = _features_yaml(out_dir / "data")
    text = render_card(config, stats, features_yaml, rows, size, eval_results=eval_results)
    path = out_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def check_push(repo_id: str) -> None:
    """Before mining: fail fast (one line) on what would only fail the upload hours later."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from hardneg.pipeline.config import ConfigError

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"--push-to-hub {repo_id!r}: not a Hub repo id (user/name)") from None
    if constants.HF_HUB_OFFLINE:
        raise ConfigError("--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set: unset it to upload "
                          "(the default model's weights are packaged: mining still needs no download)")


from hardneg.pipeline.errors import PushError  # noqa: E402,F401 - re-exported


def push_to_hub(out_dir: Path, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Upload a hub-layout output folder to a dataset repo (created when missing)."""
    out_dir = Path(out_dir)
    if not (out_dir / "README.md").is_file() or not (out_dir / "data").is_dir():
        raise PushError(f"{out_dir} is not a hub-layout output (write it with --layout hub)")
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="dataset",
                                 commit_message="hardneg: upload mined dataset",
                                 ignore_patterns=[".*", "**/.*"])
    except Exception as err:  # noqa: BLE001 - network, auth, offline mode: all one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PushError(
            f"could not push {out_dir} to the Hub dataset {repo_id} ({type(err).__name__}: {reason[:300]}); "
            f"the output is complete on disk: retry with `hf upload {repo_id} {out_dir} --repo-type dataset`"
        ) from None
    return str(getattr(info, "commit_url", None) or info)
