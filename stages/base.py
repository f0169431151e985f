"""The two kinds of stage hardneg runs, independent of where they run.

A *map stage* transforms Arrow tables batch by batch; it loads its model (if any) lazily in
`setup()`, once per worker, never on the driver, and declares the resources one worker needs.
A *global stage* consumes whole inputs at once (an index build) and writes its own files.
The runners in `pipeline/` execute both kinds, in-process or on Ray; stages never import ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa


# An input that cannot be used at all (not a bad row: those are rejects); one line, exit 2.
from hardneg.pipeline.errors import InputError  # noqa: E402,F401 - re-exported


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a local Ray counts them, not the host's
    cores): the one count both the default thread count and the Ray executor's placement use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 1024
    # At most this many workers (actors) at once; None lets the runner use what the cluster has.
    max_workers: int | None = None


class Stage:
    """Common to both kinds: a name and the configuration that determines the output."""

    name: str = "stage"
    # Bump when a stage's code changes what it writes: part of every fingerprint.
    version: str = "1"

    def fingerprint_config(self) -> dict[str, Any]:
        """Everything that changes this stage's output besides its inputs."""
        return {}

    def part_fingerprint(self, part: str) -> str | None:
        """A subfolder of this stage's output whose identity is narrower than the whole output
        (stages that read only it are keyed by it); None: the whole output's fingerprint."""
        return None

    def describe(self) -> str:
        return json.dumps(self.fingerprint_config(), sort_keys=True, default=str)


class MapStage(Stage):
    resources: Resources = Resources()
    # Where it runs, declared here only. Model stages run on a pool of long-lived workers (Ray
    # actors) so the model loads once each; a cheap per-query stage runs in the driver, so
    # re-tuning it never starts Ray or a model worker; the rest go to the run's executor.
    stateful: bool = False
    in_process: bool = False
    # How many batches the in-process runner computes at once, in threads of one process, each
    # thread limited to one core (`enter_batch_thread`). Only for a stage whose state after setup
    # is read-only and whose work mostly releases the GIL (compiled kernels, faiss, numpy, Arrow):
    # two batches side by side keep two cores busy where one batch's own threads idle between
    # its parallel parts. The output is the same: batches are independent and written in order.
    local_batches: int = 1

    def __init__(self) -> None:
        self._ready = False

    def pool_key(self) -> tuple:
        """Stages with equal keys share one pool of workers in a run (on Ray: one set of actors,
        each loading the model once). By default a stage has a pool of its own."""
        return ("stage", self.name)

    def setup(self) -> None:
        """Load models, indices... Called once per worker before the first batch."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def release(self) -> None:
        """Drop what setup loaded (models, indices, memory maps: the private attributes, which a
        worker never receives either). The runner keeps every stage of a run until its end, so
        a stage that ran in the driver would otherwise hold its index into the next stages."""
        for key in [k for k in self.__dict__ if k.startswith("_")]:
            del self.__dict__[key]
        self._ready = False

    def enter_batch_thread(self) -> None:
        """Called once in each thread of the in-process runner's pool (see `local_batches`),
        before its first batch: keep that thread's own parallelism to one core."""

    def transform(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.ensure_setup()
        return self.transform(batch)

    def __getstate__(self) -> dict[str, Any]:
        # Ship configuration to workers, never a loaded model.
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["_ready"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class GlobalStage(Stage):
    """Runs once over whole inputs. `run` writes into `out_dir` (a fresh temp dir)."""

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError


@dataclass
class StageResult:
    name: str
    path: Path
    fingerprint: str
    reused: bool
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
