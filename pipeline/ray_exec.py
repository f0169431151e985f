"""Ray Data execution of a map stage. The only module that imports ray.

read_parquet -> map_batches (an actor pool for model stages, so each worker loads its model
once; tasks otherwise) -> write_parquet. Ray retries failed tasks and restarts dead actors;
stages are pure functions of their input batches, so a retry is safe.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hardneg.stages.base import MapStage
from hardneg.stages.io import count_rows, parquet_files

log = logging.getLogger("hardneg")

# Fault tolerance of map stages (tests/test_determinism.py kills a worker mid-stage).
MAX_RESTARTS = 8  # per model worker (actor)
MAX_RETRIES = 8  # per batch


def _test_batch_delay(stage: MapStage) -> None:
    """Tests only: `HARDNEG_TEST_BATCH_DELAY=<stage>:<seconds>` makes every worker of that stage
    touch `$HARDNEG_TEST_MARK_DIR/<stage>-<pid>` (when set) and sleep before each batch, so a test
    can SIGKILL a worker in the middle of a batch (tests/test_determinism.py). Unset in normal
    use; costs one environment lookup per batch."""
    spec = os.environ.get("HARDNEG_TEST_BATCH_DELAY")
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name == stage.name:
        if os.environ.get("HARDNEG_TEST_MARK_DIR"):
            Path(os.environ["HARDNEG_TEST_MARK_DIR"], f"{name}-{os.getpid()}").touch()
        time.sleep(float(seconds or 0))


class _StageActor:
    def __init__(self, stage: MapStage) -> None:
        self.stage = stage
        self.stage.ensure_setup()

    def __call__(self, batch):
        _test_batch_delay(self.stage)
        return self.stage.transform(batch)


def _run_task(batch, stage: MapStage):
    _test_batch_delay(stage)
    return stage(batch)


def _job_env_vars() -> dict:
    """Inside a Ray job (`ray job submit`), the env vars the job's runtime_env already sets: the
    driver has them, and ray.init refuses to set one of them again."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, progress: bool = True) -> None:
        self.address = address
        self.progress = progress
        self._started = False

    def _ensure_ray(self):
        import ray

        if not ray.is_initialized():
            job_env = _job_env_vars()
            env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "HARDNEG_", "TRANSFORMERS_", "OMP_"))
                   and k not in job_env}
            kwargs = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                          logging_level=logging.ERROR, runtime_env={"env_vars": env} if env else None)
            if self.address:
                try:
                    ray.init(address=self.address, **kwargs)
                except (ConnectionError, TimeoutError, RuntimeError) as err:
                    from hardneg.pipeline.config import ConfigError

                    first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:300]
                    raise ConfigError(f"cannot join the Ray cluster at {self.address}: {first}") from None
            else:
                ray.init(**kwargs)
            self._started = True
            log.info("ray: %s", "joined " + self.address if self.address else "started a local Ray")
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = self.progress
        if not self.progress:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            logging.getLogger("ray").setLevel(logging.ERROR)
        context.print_on_execution_start = False
        return ray

    def run_map(self, stage: MapStage, input_dir: Path, out_dir: Path) -> int:
        ray = self._ensure_ray()
        files = [str(f) for f in parquet_files(input_dir)]
        dataset = ray.data.read_parquet(files)
        res = stage.resources
        if stage.stateful:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            # A worker runs `res.num_cpus` torch threads but reserves one logical CPU, so the
            # read and write tasks feeding it can always be scheduled beside it (reserving every
            # CPU for actors deadlocks a small machine).
            workers = res.max_workers or max(1, int(cpus // max(res.num_cpus, 1)))
            dataset = dataset.map_batches(
                _StageActor,
                fn_constructor_kwargs={"stage": stage},
                batch_size=res.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                num_cpus=1,
                num_gpus=res.num_gpus or None,
                # A dead worker (killed, OOM, lost node) is restarted and its batch retried: stages
                # are pure functions of their batches, and a retried write overwrites its file.
                # Bounded, so a batch that kills every worker it meets fails the run instead of
                # retrying forever (Ray Data's default is -1, unbounded).
                max_restarts=MAX_RESTARTS,
                max_task_retries=MAX_RETRIES,
            )
        else:
            dataset = dataset.map_batches(
                _run_task, fn_kwargs={"stage": stage}, batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus,
                max_retries=MAX_RETRIES,
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        dataset.write_parquet(str(out_dir))
        return count_rows(out_dir)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
