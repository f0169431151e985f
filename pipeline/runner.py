"""The stage runner: plan the stages a config needs, skip the ones whose fingerprint is already
in the work dir, run the rest (in-process or on Ray) and write the output atomically."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardneg.pipeline.config import ConfigError, MineConfig
from hardneg.pipeline.store import CODE_VERSION, FileLock, WorkDir, commit_dir, fingerprint, write_json_atomic
from hardneg.stages.base import GlobalStage, MapStage, StageResult
from hardneg.stages.calibrate import CalibrateStage, calibrated_config, needs_calibration
from hardneg.stages.candidates import CandidatesStage
from hardneg.stages.embed import EmbedStage, default_threads
from hardneg.stages.filters import FilterStage, reads_bm25, specs_from_config
from hardneg.stages.index import IndexStage
from hardneg.stages.ingest import IngestStage
from hardneg.stages.models import check_model, pick_backend, pick_device, pick_precision
from hardneg.stages.sample import SampleStage
from hardneg.stages.write import WriteStage

log = logging.getLogger("hardneg")


@dataclass
class RunResult:
    out: Path
    work_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def reused(self) -> list[str]:
        return [s.name for s in self.stages if s.reused]

    @property
    def computed(self) -> list[str]:
        return [s.name for s in self.stages if not s.reused]


def _test_pause(stage: str) -> None:
    """Tests only: `HARDNEG_TEST_PAUSE_AT=<stage>[:seconds]` sleeps (default: an hour) after
    `stage` computed its output into its temp folder and before it is committed, so a test can
    SIGKILL the run at that exact point (tests/test_resume.py) or start a second run beside it
    (tests/test_lock.py). Unset in normal use; costs one environment lookup per stage."""
    spec = os.environ.get("HARDNEG_TEST_PAUSE_AT")
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name == stage:
        log.warning("test hook: pausing before committing %s (pid %d)", stage, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        time.sleep(float(seconds or 3600))


def resolve_output(out: Path) -> Path:
    """A symlink to a folder stands for that folder: the output is written there (and the link
    is kept). Any other symlink is refused by check_output."""
    out = Path(out)
    return out.resolve() if out.is_symlink() and out.resolve().is_dir() else out


def check_output(out: Path) -> None:
    """Refuse an output path hardneg must not replace: an existing file, or a folder with
    anything in it that hardneg did not write (a run replaces its output folder whole)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"output {out} exists and is not a folder: refusing to replace it")
    if out.is_dir() and not (out / "hardneg.json").is_file() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not a hardneg output: refusing to replace it "
                          "(give a new or empty folder)")


def check_apart(out: Path, work: Path) -> None:
    """The output is replaced whole on every write and the work dir holds the cache: one inside
    the other would destroy the cache or fill the dataset folder with stage folders."""
    o, w = Path(out).resolve(), Path(work).resolve()
    if o == w or w.is_relative_to(o) or o.is_relative_to(w):
        where = "is" if o == w else ("is inside" if w.is_relative_to(o) else "contains")
        raise ConfigError(f"the work dir {work} {where} the output {out}: give them separate folders "
                          "(the default work dir is .hardneg-work beside the output)")


def output_files(folder: Path) -> dict[str, int]:
    """Every file of an output folder (relative path -> size), as its manifest records them."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def output_is_whole(out: Path, manifest: dict[str, Any]) -> bool:
    """Every file the manifest lists exists with its size. An old manifest lists none: rebuilt."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = Path(out) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def clean_output_temps(out: Path) -> int:
    """Remove what a crashed write of `out` left beside it: its temp folder (`.tmp-NAME-PID`) and
    a replaced output not yet deleted (`.tmp-old-NAME-XXXXXXXX`). Called under the output's lock,
    so no live run is writing them; other outputs' temps in the same folder never match."""
    removed = 0
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        name = path.name
        mine = (name.startswith(f".tmp-{out.name}-") and name[len(f".tmp-{out.name}-"):].isdigit()) or (
            name.startswith(f".tmp-old-{out.name}-") and len(name) - len(f".tmp-old-{out.name}-") == 8
            and all(ch in "0123456789abcdef" for ch in name[len(f".tmp-old-{out.name}-"):]))
        if mine:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def default_work_dir(out: Path) -> Path:
    return Path(out).resolve().parent / ".hardneg-work"


class Pipeline:
    def __init__(self, config: MineConfig, *, progress: bool = True, require_out: bool = True) -> None:
        config.check_inputs(require_out=require_out)
        self.config = config
        self.out = resolve_output(Path(config.out)) if config.out else None
        if config.work_dir:
            self.work = WorkDir(Path(config.work_dir))
        elif self.out is not None:
            self.work = WorkDir(default_work_dir(self.out))
        else:
            raise ConfigError("give a work dir (work_dir) to cache stage outputs")
        self.progress = progress
        self.device = pick_device(config.device)
        self.precision = pick_precision(config.precision, self.device)
        self.backend = pick_backend(config.embed_backend, self.device, self.precision)
        self.threads = config.threads or default_threads()
        if config.runner == "ray":
            from hardneg.pipeline.ray_exec import RayExecutor

            # Ray's own log lines go to a file in the work dir (a failure message names it).
            self.executor = RayExecutor(config.ray_address, progress, log_file=self.work.root / ".ray.log")
        else:
            from hardneg.pipeline.local import LocalExecutor

            self.executor = LocalExecutor(progress)
        self.results: list[StageResult] = []

    # ------------------------------------------------------------------ running stages
    @staticmethod
    def _fingerprint(stage, upstream: list[StageResult | str]) -> tuple[str, list[str]]:
        upstream = [u if isinstance(u, str) else u.fingerprint for u in upstream]
        return fingerprint(stage.name, stage.version, stage.fingerprint_config(), upstream), upstream

    def _run(self, stage, upstream: list[StageResult | str], inputs: dict[str, Path], *, map_input: Path | None = None, in_process: bool = False) -> StageResult:
        fp, upstream = self._fingerprint(stage, upstream)
        if self.work.is_done(stage.name, fp):
            result = StageResult(stage.name, self.work.path(stage.name, fp), fp, reused=True,
                                 info=self.work.manifest(stage.name, fp).get("info", {}))
            log.info("%-16s reused  (%s)", stage.name, fp[:12])
        else:
            started = time.monotonic()
            tmp = self.work.new_temp(stage.name)
            try:
                if isinstance(stage, MapStage):
                    executor = self.executor
                    if in_process and self.executor.name != "local":
                        from hardneg.pipeline.local import LocalExecutor

                        executor = LocalExecutor(self.progress)
                    rows = executor.run_map(stage, map_input, tmp)
                    info = {"rows": rows}
                else:
                    info = stage.run(inputs, tmp) or {}
                _test_pause(stage.name)
                seconds = time.monotonic() - started
                path = self.work.commit(tmp, stage.name, fp, {
                    "config": stage.fingerprint_config(), "upstream": upstream,
                    "code_version": CODE_VERSION, "seconds": seconds, "info": info,
                })
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            result = StageResult(stage.name, path, fp, reused=False, seconds=seconds, info=info)
            rate = f", {info['rows']} rows, {info['rows'] / max(seconds, 1e-9):.1f} rows/s" if "rows" in info else ""
            log.info("%-16s done    (%s) in %.1fs%s", stage.name, fp[:12], seconds, rate)
        self.results.append(result)
        return result

    # ------------------------------------------------------------------ the plan
    def run(self) -> RunResult:
        c = self.config
        # Checks that need no file written: a run that cannot succeed leaves nothing behind.
        check_model(c.model, "embedding")
        if c.cross_encoder:
            check_model(c.cross_encoder, "cross-encoder")
        check_output(self.out)
        check_apart(self.out, self.work.root)
        with self.work.lock(), FileLock(self.out.parent / f".{self.out.name}.lock", f"output {self.out}"):
            self.work.clean_temps()
            clean_output_temps(self.out)
            try:
                return self._run_all()
            finally:
                self.executor.close()

    def _embed(self, label: str, prompt: str | None, id_column: str, keep: bool) -> EmbedStage:
        c = self.config
        return EmbedStage(
            model=c.model, id_column=id_column, text_column="text", prompt=prompt, max_seq_length=c.max_seq_length,
            precision=self.precision, device=self.device, backend=self.backend, micro_batch_size=c.embed_batch_size, threads=self.threads,
            keep_columns=keep, trust_remote_code=c.trust_remote_code, max_workers=c.workers, label=label,
        )

    def _run_all(self) -> RunResult:
        ingest, queries, index, corpus_fp = self._embed_and_index()
        return self._mine(ingest, queries, index, corpus_fp)

    def run_until_index(self) -> dict[str, StageResult]:
        """Ingest, embed and index only (cached like any run): for eval and benchmarks."""
        with self.work.lock():
            self.work.clean_temps()
            check_model(self.config.model, "embedding")
            try:
                ingest, queries, index, _ = self._embed_and_index()
            finally:
                self.executor.close()
        return {"ingest": ingest, "queries": queries, "index": index}

    def _embed_and_index(self):
        c = self.config
        ingest_stage = IngestStage(c)
        corpus_fp = ingest_stage.corpus_fingerprint()
        embed_queries = None if c.query_embeddings is not None else self._embed("embed_queries", c.query_prompt, "query_id", keep=True)
        embed_corpus = None if c.corpus_embeddings is not None else self._embed("embed_corpus", c.corpus_prompt, "doc_id", keep=False)
        # Start the model workers now, so they load while ingest runs: fingerprints are known
        # before ingest computes anything, and a stage already in the work dir starts nothing.
        ingest_fp, _ = self._fingerprint(ingest_stage, [])
        todo = [stage for stage, up in ((embed_queries, ingest_fp), (embed_corpus, corpus_fp))
                if stage is not None and not self.work.is_done(stage.name, self._fingerprint(stage, [up])[0])]
        self.executor.prepare(todo)
        ingest = self._run(ingest_stage, [], {})
        ingest_dir = ingest.path
        # An empty corpus first: it is the cause when every judgement points at a missing document.
        if ingest.info.get("corpus_rows", 0) == 0:
            raise ConfigError("the corpus is empty: no document survived ingest")
        if ingest.info.get("pairs", 0) == 0:
            raise ConfigError("no usable pairs in the input (rejects by reason: "
                              + ", ".join(f"{k}={v}" for k, v in ingest.info.get("rejects", {}).items()) + ")")

        if c.query_embeddings is not None:
            from hardneg.stages.precomputed import PrecomputedQueryVectors

            queries = self._run(PrecomputedQueryVectors(Path(c.query_embeddings)), [ingest], {},
                                map_input=ingest_dir / "queries", in_process=True)
        else:
            queries = self._run(embed_queries, [ingest], {}, map_input=ingest_dir / "queries")
        if c.corpus_embeddings is not None:
            from hardneg.stages.precomputed import PrecomputedEmbeddings

            corpus = self._run(PrecomputedEmbeddings(Path(c.corpus_embeddings)), [], {})
        else:
            corpus = self._run(embed_corpus, [corpus_fp], {}, map_input=ingest_dir / "corpus")
        if c.index.index != "auto":  # parsed at config time; now with the vectors' real size
            from hardneg.pipeline.config import check_factory_string
            from hardneg.stages.index import embedding_dim

            check_factory_string(c.index.index, (embedding_dim(corpus.path),))
        index = self._run(IndexStage(c.index), [corpus_fp, corpus],
                          {"corpus": ingest_dir / "corpus", "embeddings": corpus.path})
        return ingest, queries, index, corpus_fp

    def _mine(self, ingest: StageResult, queries: StageResult, index: StageResult, corpus_fp: str) -> RunResult:
        c = self.config
        ingest_dir = ingest.path
        bm25 = None
        upstream = [queries, index]
        # BM25 mines candidates (a miner) or only scores the dense ones (a filter reads bm25).
        score_bm25 = reads_bm25(c)
        if "bm25" in c.miners or score_bm25:
            from hardneg.stages.bm25_miner import BM25IndexStage

            bm25 = self._run(BM25IndexStage(c.bm25), [corpus_fp], {"corpus": ingest_dir / "corpus"})
            upstream.append(bm25)
        index_config = c.index
        if needs_calibration(c.index, index.path):
            calibration = self._run(CalibrateStage(c.index, k=c.range_max, seed=c.seed), [index, queries],
                                    {"index": index.path, "queries": queries.path})
            index_config = calibrated_config(c.index, calibration.path)
            upstream.append(calibration)
        candidates = self._run(
            CandidatesStage(miners=c.miners, range_max=c.range_max, rrf_k=c.rrf_k, index_dir=index.path,
                            index_config=index_config, bm25_dir=bm25.path if bm25 else None, bm25_config=c.bm25,
                            threads=self.threads, max_workers=c.workers, score_bm25=score_bm25),
            upstream, {}, map_input=queries.path,
        )
        specs = specs_from_config(c)
        scored = candidates
        if c.cross_encoder:
            from hardneg.stages.rerank import RerankStage

            scored = self._run(
                RerankStage(model=c.cross_encoder, specs=specs, batch_size=c.ce_batch_size, max_length=c.ce_max_length,
                            device=self.device, threads=self.threads, trust_remote_code=c.trust_remote_code,
                            max_workers=c.workers, corpus_dir=ingest_dir / "corpus"),
                [candidates], {}, map_input=candidates.path,
            )
        # Filtering and sampling are cheap per query: they run in-process, so re-tuning a
        # threshold never starts Ray or a model worker.
        filtered = self._run(FilterStage(specs, seed=c.seed, fit_input=scored.path, false_negatives=c.false_negatives,
                                         bm25_dir=bm25.path if bm25 else None, bm25_config=c.bm25, corpus_dir=ingest_dir / "corpus"),
                             [scored] + ([bm25] if bm25 else []), {}, map_input=scored.path, in_process=True)
        sampled = self._run(
            SampleStage(num_negatives=c.num_negatives, strategy=c.sampling_strategy, seed=c.seed, score=c.score,
                        temperature=c.temperature, mmr_lambda=c.mmr_lambda, index_dir=index.path,
                        consistency_top_k=c.consistency_top_k, consistency_min_score=c.consistency_min_score,
                        quotas=c.quotas, relabel=c.false_negatives == "relabel"),
            [filtered], {}, map_input=filtered.path, in_process=True,
        )
        write = WriteStage(format=c.format, num_negatives=c.num_negatives, metadata_columns=c.metadata_columns, layout=c.layout,
                           relabel=c.false_negatives == "relabel")
        stats = self._write_output(write, [ingest, filtered, sampled], {
            "mined": sampled.path, "filtered": filtered.path, "corpus": ingest_dir / "corpus",
            "rejects": ingest_dir / "rejects", "pairs": ingest_dir / "pairs",
        })
        return RunResult(self.out, self.work.root, self.results, stats)

    def _write_output(self, stage: WriteStage, upstream: list[StageResult], inputs: dict[str, Path]) -> dict[str, Any]:
        """The output folder is not in the work dir but follows the same rules: rebuilt only when
        its fingerprint changed, and replaced atomically."""
        fp = fingerprint(stage.name, stage.version, stage.fingerprint_config(), [u.fingerprint for u in upstream])
        manifest = self.out / "hardneg.json"
        if manifest.is_file():
            import json

            old = json.loads(manifest.read_text())
            if old.get("fingerprint") == fp and output_is_whole(self.out, old):
                log.info("%-16s reused  (%s)", stage.name, fp[:12])
                self.results.append(StageResult(stage.name, self.out, fp, reused=True))
                return old.get("stats", {})
            if old.get("fingerprint") == fp:
                log.warning("the output %s is damaged (a file is missing or changed size): writing it again", self.out)
        started = time.monotonic()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.parent / f".tmp-{self.out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            stats = stage.run(inputs, tmp)
            stats["stages"] = {r.name: {"reused": r.reused, "seconds": round(r.seconds, 3), "path": str(r.path)} for r in self.results}
            stats["config"] = self.config.model_dump(mode="json")
            write_json_atomic(tmp / "stats.json", stats)
            if self.config.layout == "hub":
                from hardneg.pipeline.card import write_card

                write_card(tmp, self.config, stats)
            _test_pause(stage.name)
            commit_dir(tmp, self.out, {"fingerprint": fp, "stats": stats, "code_version": CODE_VERSION,
                                       "files": output_files(tmp)}, name=manifest.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        self.results.append(StageResult(stage.name, self.out, fp, reused=False, seconds=seconds))
        log.info("%-16s done    (%s) in %.1fs", stage.name, fp[:12], seconds)
        return stats
