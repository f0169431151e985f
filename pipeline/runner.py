"""The stage runner: plan the stages a config needs, skip the ones whose fingerprint is already
in the work dir, run the rest (in-process or on Ray) and write the output atomically."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hardneg.pipeline.config import ConfigError, MineConfig
from hardneg.pipeline.executors import hook_seconds_for_tests
from hardneg.pipeline.plan import Machine, Node, index_plan, mine_plan
from hardneg.pipeline.store import (CODE_VERSION, FileLock, WorkDir, commit_dir, default_work_dir, fingerprint,
                                    write_json_atomic)
from hardneg.stages.base import MapStage, StageResult
from hardneg.stages.embed import default_threads
from hardneg.stages.io import arrow_allocator
from hardneg.stages.models import check_model, pick_backend, pick_device, pick_precision
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


@dataclass
class _Done:
    """The nodes a run has resolved so far: their stages and results."""

    results: dict[str, StageResult] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)  # stages built ahead (see _prepare_models)
    stats: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, stage, result: StageResult) -> None:
        self.stages[name], self.results[name] = stage, result

    def resolve(self, node: Node) -> tuple[dict[str, Path], list[str]]:
        """The node's input folders and its upstream fingerprints, in declaration order. An
        input whose node was skipped (its `when`) is absent; a part ("ingest/corpus") is a
        subfolder, keyed by the part's own fingerprint where its stage declares a narrower one."""
        inputs: dict[str, Path] = {}
        upstream: list[str] = []
        for name, ref in node.inputs.items():
            source, _, part = ref.partition("/")
            if source not in self.results:
                continue
            result = self.results[source]
            inputs[name] = result.path / part if part else result.path
            if name not in node.covered:
                narrower = self.stages[source].part_fingerprint(part) if part else None
                upstream.append(narrower or result.fingerprint)
        return inputs, upstream


def _test_pause(stage: str) -> None:
    """Tests only: `HARDNEG_TEST_PAUSE_AT=<stage>[:seconds]` sleeps (default: an hour) after
    `stage` computed its output into its temp folder and before it is committed, so a test can
    SIGKILL the run at that exact point (tests/test_resume.py) or start a second run beside it
    (tests/test_lock.py). Unset in normal use; costs one environment lookup per stage."""
    seconds = hook_seconds_for_tests("HARDNEG_TEST_PAUSE_AT", stage, 3600)
    if seconds is not None:
        log.warning("test hook: pausing before committing %s (pid %d)", stage, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        time.sleep(seconds)


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


class Pipeline:
    def __init__(self, config: MineConfig, *, progress: bool = True, require_out: bool = True,
                 write_card: Callable[[Path, MineConfig, dict], Any] | None = None) -> None:
        config.check_inputs(require_out=require_out)
        self.config = config
        # The hub layout's dataset card (outputs/card.py) is a reader of finished outputs: it is
        # handed in (run_mine does), so orchestration never imports what reads its outputs.
        self.write_card = write_card
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
            from hardneg.pipeline.executors.ray import RayExecutor

            # Ray's own log lines go to a file in the work dir (a failure message names it).
            self.executor = RayExecutor(config.ray_address, progress, log_file=self.work.root / ".ray.log")
        else:
            from hardneg.pipeline.executors.local import LocalExecutor

            self.executor = LocalExecutor(progress)
        self.results: list[StageResult] = []

    # ------------------------------------------------------------------ running stages
    @staticmethod
    def _fingerprint(stage, upstream: list[str], config: dict | None = None) -> str:
        config = stage.fingerprint_config() if config is None else config
        return fingerprint(stage.name, stage.version, config, upstream)

    def _run(self, stage, upstream: list[str], inputs: dict[str, Path], *, map_input: Path | None = None) -> StageResult:
        """Reuse the stage's output if the work dir has its fingerprint, else compute and commit it."""
        config = stage.fingerprint_config()
        fp = self._fingerprint(stage, upstream, config)
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
                    # A cheap per-query stage runs in the driver: re-tuning it never starts Ray.
                    if stage.in_process and self.executor.name != "local":
                        from hardneg.pipeline.executors.local import LocalExecutor

                        executor = LocalExecutor(self.progress)
                    rows = executor.run_map(stage, map_input, tmp)
                    info = {"rows": rows}
                else:
                    info = stage.run(inputs, tmp) or {}
                _test_pause(stage.name)
                seconds = time.monotonic() - started
                path = self.work.commit(tmp, stage.name, fp, {
                    "config": config, "upstream": upstream,
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

    @property
    def machine(self) -> Machine:
        return Machine(device=self.device, precision=self.precision, backend=self.backend, threads=self.threads)

    def _run_all(self) -> RunResult:
        from hardneg.stages.ingest import fingerprint_ahead

        vectors = [Path(p) for p in (self.config.corpus_embeddings, self.config.query_embeddings) if p is not None]
        fingerprint_ahead(*vectors, *(p.with_suffix(".ids.txt") for p in vectors if p.suffix == ".npy"))
        done = self._execute(mine_plan(self.config, self.machine))
        return RunResult(self.out, self.work.root, self.results, done.stats)

    def run_until_index(self) -> dict[str, StageResult]:
        """Ingest, embed and index only (cached like any run): for eval and benchmarks."""
        with self.work.lock():
            self.work.clean_temps()
            check_model(self.config.model, "embedding")
            try:
                nodes = index_plan(self.config, self.machine)
                done = self._execute(nodes)
            finally:
                self.executor.close()
        return {"ingest": done.results["ingest"], "queries": done.results[nodes[1].name],
                "index": done.results["index"]}

    def _execute(self, nodes: list[Node]) -> _Done:
        """Run the plan's nodes in order; every input folder and upstream fingerprint comes from
        the nodes' declarations."""
        with arrow_allocator():
            return self._execute_nodes(nodes)

    def _execute_nodes(self, nodes: list[Node]) -> _Done:
        done = _Done()
        self._prepare_models(nodes, done)
        for node in nodes:
            inputs, upstream = done.resolve(node)
            if node.when is not None and not node.when(inputs):
                continue
            stage = done.built.pop(node.name, None) or node.build(inputs)
            if node.final:
                # Nothing after the final node runs on workers: let them stop while it writes.
                self.executor.close()
                done.stats = self._write_output(stage, upstream, inputs)
                continue
            result = self._run(stage, upstream, inputs, map_input=inputs.get(node.rows) if node.rows else None)
            if node.check is not None:
                node.check(result)
            done.add(node.name, stage, result)
        return done

    def _prepare_models(self, nodes: list[Node], done: _Done) -> None:
        """Start the model workers of the stages that read only stages without inputs (the
        embeddings of ingest's tables), so they load while ingest runs: their fingerprints are
        known before ingest computes anything, and a stage already in the work dir starts nothing."""
        by_name = {node.name: node for node in nodes}
        roots = {node.name for node in nodes if not node.inputs and node.when is None}
        predicted = _Done()
        for name in roots:
            stage = by_name[name].build({})
            done.built[name] = stage  # built once: ingest hashes its input files
            fp = self._fingerprint(stage, [])
            predicted.add(name, stage, StageResult(name, self.work.path(stage.name, fp), fp, reused=True))
        todo = []
        for node in nodes:
            if node.inputs and set(node.sources()) <= roots and node.when is None:
                stage = node.build(predicted.resolve(node)[0])
                if isinstance(stage, MapStage) and stage.stateful and not self.work.is_done(
                        stage.name, self._fingerprint(stage, predicted.resolve(node)[1])):
                    todo.append(stage)
        self.executor.prepare(todo)

    def _write_output(self, stage: WriteStage, upstream: list[str], inputs: dict[str, Path]) -> dict[str, Any]:
        """The output folder is not in the work dir but follows the same rules: rebuilt only when
        its fingerprint changed, and replaced atomically."""
        fp = self._fingerprint(stage, upstream)
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
            if self.config.layout == "hub" and self.write_card is not None:
                self.write_card(tmp, self.config, stats)
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
