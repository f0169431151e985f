"""The mining configuration: one pydantic model, the same keys in YAML, on the command line
(`--set key=value`) and in the Python API. Key names follow sentence-transformers'
`mine_hard_negatives` wherever it has one."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hardneg.pipeline.errors import ConfigError
from hardneg.stages.engines.faiss_index import IndexConfig
from hardneg.stages.engines.bm25 import BM25Config
from hardneg.stages.models import DEFAULT_MODEL

Format = Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"]
Score = Literal["dense", "bm25", "cross_encoder"]

# The default false-negative filters (README, "The defaults"), chosen on half A of Cranfield's and
# CACM's queries and confirmed on half B (benchmarks/fn_curve.py, benchmarks/RESULTS.md): drop the
# candidates lexically closest to the query's positive (the 45% with the highest BM25 score against
# the positive's text: lexical near-duplicates) and the 35% that BM25 scores highest for the query
# (a second, lexical retriever that also finds them relevant); `top` then takes the best-ranked
# survivors. Both are per-query percentiles: no model- or collection-specific threshold.
DEFAULT_RANGE_MIN = 0
DEFAULT_FILTERS: list[dict] = [
    {"type": "lexical_duplicate", "value": 55},
    {"type": "percentile", "value": 65, "score": "bm25"},
]
DEFAULT_SAMPLING = "top"


# sentence-transformers' `mine_hard_negatives` argument names that mean a hardneg key: accepted
# as aliases everywhere (MineConfig(...), YAML, --set, the Python API).
ST_ALIASES: dict[str, str] = {
    "anchor_column_name": "query_column",
    "positive_column_name": "positive_column",
    "output_format": "format",
    "batch_size": "embed_batch_size",
    "cache_folder": "work_dir",
}


def _alias(name: str) -> AliasChoices:
    """The key's own name or its sentence-transformers alias."""
    return AliasChoices(name, next(k for k, v in ST_ALIASES.items() if v == name))


def canonical_keys(data: dict) -> dict:
    """`data` with sentence-transformers' names replaced by hardneg's (a later key wins when both
    are given, as with any repeated key)."""
    out: dict = {}
    for key, value in data.items():
        name = ST_ALIASES.get(key, key)
        out.pop(name, None)
        out[name] = value
    return out


class MineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    # --- inputs ---
    beir: Path | None = Field(None, description="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (each may be .gz)")
    pairs: Path | None = Field(None, description="pair file: JSONL, CSV or TSV (each may be .gz), Parquet, or a datasets save_to_disk folder")
    corpus: Path | None = Field(None, description="corpus for --pairs (JSONL, CSV, TSV, maybe .gz, or Parquet, with id and text); default: the positives")
    split: str = Field("test", description="qrels split of a BEIR folder")
    positives: Literal["all", "best"] = Field("all", description="one pair per judged positive, or per query its best-graded one")
    hide_extra_positives: bool = Field(False, description="with positives=best: leave the other judged positives in the candidate pool (to measure false negatives)")
    query_column: str | None = Field(None, validation_alias=_alias("query_column"), description="pair file: query text column (default: first column)")
    positive_column: str | None = Field(None, validation_alias=_alias("positive_column"), description="pair file: positive text column (default: second column)")
    query_id_column: str | None = Field(None, description="pair file: query id column (default: content hash of the text)")
    positive_id_column: str | None = Field(None, description="pair file: positive id column (default: content hash of the text)")
    corpus_id_column: str = Field("_id", description="corpus file id column")
    corpus_text_column: str = Field("text", description="corpus file text column")
    corpus_embeddings: Path | None = Field(None, description="precomputed corpus vectors (Parquet with id+embedding, or .npy with ids beside)")
    query_embeddings: Path | None = Field(None, description="precomputed query vectors (same forms as corpus_embeddings)")

    # --- output ---
    out: Path | None = Field(None, description="output folder (a datasets save_to_disk folder)")
    work_dir: Path | None = Field(None, validation_alias=_alias("work_dir"), description="cache of stage outputs (default: .hardneg-work beside the output)")
    format: Format = Field("n-tuple", validation_alias=_alias("format"), description="output format, as sentence-transformers names them")
    layout: Literal["disk", "hub"] = Field("disk", description="disk: datasets save_to_disk; hub: data/*.parquet + dataset card")
    metadata_columns: bool = Field(True, description="keep ids, scores, ranks and sources beside the texts")

    # --- embedding ---
    model: str = Field(DEFAULT_MODEL, description="bi-encoder: local path or hub id")
    query_prompt: str | None = Field(None, description="prefix added to queries before embedding")
    corpus_prompt: str | None = Field(None, description="prefix added to documents before embedding")
    max_seq_length: int | None = Field(None, gt=0, description="truncate texts to this many tokens (default: the model's)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: fp16 on GPU, bf16 on CPUs with native bf16, else fp32")
    device: str = Field("auto", description="auto, cpu, cuda")
    embed_backend: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="auto: OpenVINO on CPUs with native bf16 when installed (1.4x torch there), else torch")
    embed_batch_size: int = Field(32, validation_alias=_alias("embed_batch_size"), gt=0, description="texts per forward pass")
    trust_remote_code: bool = Field(False, description="let models run their own code (off: safe by default)")

    # --- candidates ---
    miners: list[Literal["dense", "bm25"]] = Field(["dense"], min_length=1, description="candidate sources, any subset of dense,bm25")
    index: IndexConfig = Field(default_factory=IndexConfig, description="FAISS index (index.index, index.nprobe, ...)")
    bm25: BM25Config = Field(default_factory=BM25Config, description="BM25 (bm25.engine, bm25.k1, bm25.b, ...)")
    rrf_k: int = Field(60, gt=0, description="reciprocal rank fusion constant")
    quotas: dict[str, int] | None = Field(None, description="per-source quotas of sampled negatives, e.g. {dense: 3, bm25: 2}")
    cross_encoder: str | None = Field(None, description="cross-encoder to rescore surviving candidates: local path or hub id")
    ce_batch_size: int = Field(32, gt=0, description="cross-encoder pairs per forward pass")
    ce_max_length: int | None = Field(None, gt=0, description="cross-encoder max tokens per pair")

    # --- filters (sentence-transformers meanings) ---
    range_min: int = Field(DEFAULT_RANGE_MIN, ge=0, description="skip the top range_min candidates of each query")
    range_max: int = Field(100, gt=0, description="consider only the top range_max candidates of each source")
    max_score: float | None = Field(None, description="drop candidates scoring above this")
    min_score: float | None = Field(None, description="drop candidates scoring below this")
    absolute_margin: float | None = Field(None, description="drop candidates with score > positive_score - absolute_margin")
    relative_margin: float | None = Field(None, description="drop candidates with score > positive_score - relative_margin * |positive_score|")
    score: Score = Field("dense", description="which score the filters above use")
    filters: list[dict] = Field(DEFAULT_FILTERS, description="filter chain after the keys above, in order: "
                                "[{type: near_duplicate, threshold: 0.95}, {type: percentile, value: 95, score: dense}, ...]")
    false_negatives: Literal["drop", "relabel"] = Field("drop", description="drop: every candidate a filter judges relevant is dropped; "
        "relabel: those a pu filter judges relevant with high confidence (above its relabel level) become extra positives of their query")
    consistency_top_k: int | None = Field(None, gt=0, description="keep a pair only if its positive ranks in the top k of its query's dense ranking of the corpus")
    consistency_min_score: float | None = Field(None, description="keep a pair only if its positive's dense score is at least this")

    # --- sampling ---
    num_negatives: int = Field(5, gt=0, description="negatives per pair")
    sampling_strategy: Literal["top", "random", "softmax", "mmr"] = Field(
        DEFAULT_SAMPLING, description="top: hardest survivors; random: seeded sample; softmax: seeded sample with p ~ exp(score/temperature); "
        "mmr: maximal marginal relevance (hard and mutually diverse)")
    temperature: float = Field(0.05, gt=0, description="softmax sampling temperature")
    mmr_lambda: float = Field(0.7, ge=0, le=1, description="mmr: weight of the score against diversity")
    seed: int = Field(12, description="seed for every random choice")

    # --- execution ---
    runner: Literal["ray", "local"] = Field("ray", description="ray (local Ray or --ray-address) or local (in-process)")
    ray_address: str | None = Field(None, description="join an existing Ray cluster (ray://host:10001 or auto)")
    workers: int | None = Field(None, gt=0, description="max model workers (actors) per stage")
    threads: int | None = Field(None, gt=0, description="CPU threads per model worker; in-process, the batches computed side by side (default: min(4, cores))")

    @field_validator("miners", mode="before")
    @classmethod
    def _split_miners(cls, value):
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("index", mode="before")
    @classmethod
    def _gpu_words(cls, value):
        # YAML (and so --set) reads the README's `on` / `off` as booleans.
        if isinstance(value, dict) and isinstance(value.get("gpu"), bool):
            value = {**value, "gpu": "on" if value["gpu"] else "off"}
        return value

    @field_validator("quotas")
    @classmethod
    def _check_quotas(cls, value):
        for source, quota in (value or {}).items():
            if quota < 0:
                raise ValueError(f"quotas.{source} is {quota}: a quota counts negatives, it cannot be negative")
        return value

    @model_validator(mode="after")
    def _check(self) -> "MineConfig":
        if self.score == "cross_encoder" and not self.cross_encoder:
            raise ValueError("score=cross_encoder needs a cross_encoder")
        if self.range_min >= self.range_max:
            raise ValueError("range_min must be below range_max")
        if self.consistency_top_k is not None and self.consistency_top_k > self.range_max:
            raise ValueError("consistency_top_k must be at most range_max (the dense search depth)")
        if self.index.index != "auto":
            check_factory_string(self.index.index)
        # Candidates per pair: range_max per miner, fused, then the top range_min skipped.
        most = self.range_max * len(self.miners) - self.range_min
        if self.num_negatives > most:
            raise ValueError(f"num_negatives={self.num_negatives} can never be met: a pair has at most {most} candidates "
                             f"(range_max={self.range_max} per miner x {len(self.miners)} miner(s) - range_min={self.range_min}); "
                             "raise range_max or lower num_negatives")
        for source in self.quotas or {}:
            if source not in self.miners:
                raise ValueError(f"quotas.{source}: {source} is not among the miners ({','.join(self.miners)})")
        from hardneg.pipeline.errors import FilterSpecError
        from hardneg.stages.filters import specs_from_config

        try:
            specs = specs_from_config(self.filter_chain())
        except FilterSpecError as err:
            raise ValueError(str(err)) from None
        for spec in specs:
            if spec["score"] == "cross_encoder" and not self.cross_encoder:
                raise ValueError(f"filter {spec['name']} reads the cross_encoder score: give a cross_encoder")
            if spec["type"] == "agreement" and len(self.miners) < 2:
                raise ValueError(f"filter {spec['name']} needs two miners (miners: dense,bm25)")
        return self

    # The typed parts each stage reads: a stage never sees the whole run's config.
    def ingest_config(self):
        from hardneg.stages.ingest import IngestConfig

        return IngestConfig.of(self)

    def filter_chain(self):
        from hardneg.stages.filters import FilterChainConfig

        return FilterChainConfig.of(self)

    def check_inputs(self, require_out: bool = True) -> None:
        """Checks the model validators cannot do (files exist, one source given, the machine has
        what the config asks for), made before anything is read or computed."""
        from hardneg.stages.ingest import beir_file, check_table_format

        if (self.beir is None) == (self.pairs is None):
            raise ConfigError("give exactly one input: --beir DIR or --pairs FILE")
        if self.beir is not None:
            for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{self.split}.tsv"):
                if beir_file(self.beir, name) is None:
                    raise ConfigError(f"BEIR folder {self.beir}: missing {name}")
        if self.pairs is not None and not self.pairs.exists():
            raise ConfigError(f"pair file not found: {self.pairs}")
        if self.corpus is not None and not self.corpus.exists():
            raise ConfigError(f"corpus file not found: {self.corpus}")
        for what, path in (("pair", self.pairs), ("corpus", self.corpus)):
            if path is not None:
                check_table_format(Path(path), what)
        if self.index.gpu == "on":
            from hardneg.stages.engines.faiss_index import gpu_status

            usable, why = gpu_status()
            if not usable:
                raise ConfigError(f"index.gpu=on but faiss cannot use a GPU here ({why}): use index.gpu=auto or off")
        if self.corpus_embeddings is not None and not self.corpus_embeddings.exists():
            raise ConfigError(f"corpus embeddings not found: {self.corpus_embeddings}")
        if require_out and self.out is None:
            raise ConfigError("give an output folder: --out DIR")


# Embedding sizes a factory string is tried with: whatever the model, a string that parses for
# none of them is not a FAISS index (6720 = 2^6*3*5*7 divides most PQ/OPQ sub-quantizer counts).
# The runner checks it again with the real dimension before building the index.
_FACTORY_DIMS = (384, 768, 1024, 6720)


def check_factory_string(factory: str, dims: tuple[int, ...] = _FACTORY_DIMS) -> None:
    """Refuse, before any embedding, an `index.index` FAISS cannot build (one line)."""
    import faiss

    last = ""
    for d in dims:
        try:
            faiss.index_factory(int(d), factory, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as err:  # faiss reports a bad string as a C++ exception
            last = (str(err).strip().splitlines() or [""])[-1]
    reason = last.rsplit(": ", 1)[-1][:160] if last else "not parsed"
    where = "" if len(dims) > 1 else f" for {dims[0]}-dimensional vectors"
    raise ConfigError(f"index.index={factory!r} is not a FAISS index factory string{where} ({reason}); "
                      "e.g. Flat, IVF4096,SQfp16, HNSW32, or auto")


def describe_keys() -> str:
    """Every config key with its type and default, for `hardneg mine --help`."""
    lines = []
    for name, field in MineConfig.model_fields.items():
        default = field.default if field.default_factory is None else "(see below)"
        aliases = [k for k, v in ST_ALIASES.items() if v == name]
        also = f" (also: {', '.join(aliases)})" if aliases else ""
        lines.append(f"{name}{also} = {default!r}: {field.description or ''}")
    for prefix, model in (("index", IndexConfig), ("bm25", BM25Config)):
        for name, field in model.model_fields.items():
            lines.append(f"{prefix}.{name} = {field.default!r}")
    return "\n".join(lines)


def parse_assignment(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def build_config(
    yaml_file: Path | None = None, overrides: dict | None = None, assignments: list[str] = ()
) -> MineConfig:
    """Merge (in rising priority) the YAML file, explicit options and --set assignments."""
    data: dict = {}
    if yaml_file is not None:
        if not yaml_file.is_file():
            raise ConfigError(f"config file not found: {yaml_file}")
        try:
            loaded = yaml.safe_load(yaml_file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {yaml_file}: invalid YAML ({err.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {yaml_file}: expected a mapping of keys")
        data.update(canonical_keys(loaded))
    for key, value in (overrides or {}).items():
        if value is not None:
            data[ST_ALIASES.get(key, key)] = value
    for text in assignments:
        path, value = parse_assignment(text)
        path[0] = ST_ALIASES.get(path[0], path[0])
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {text}: {part} is not a section")
        target[path[-1]] = value
    try:
        return MineConfig(**data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown config key"
    if first["type"] == "value_error":  # our own checks: their message names the keys already
        message = message.removeprefix("Value error, ")
        where = "" if where == "config" else where
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"config error: {where + ': ' if where else ''}{message}{more}"
