"""Ray execution of map stages. The only module that imports ray.

Each model (more generally, each `MapStage.pool_key()`) gets ONE pool of Ray actors per run,
started as soon as the runner knows the stage will be computed (while ingest runs) and shared by
every stage with that key: queries and corpus are embedded by the same workers, which load the
model once. (A Ray Data actor pool lives for one dataset execution, so two
stages would start two pools; this is why map stages drive actors directly.)

A local Ray (the default on one machine) starts in a background thread: Ray's own start takes
seconds, and its workers take more to import and load the model. Until a stage's workers are up,
the driver computes that stage's batches itself, in input order, as the in-process runner does
(a batch's result does not depend on where it ran); then it hands the rest to the workers. On a
cluster the driver only drives.

Where a machine has room for only one worker of a stage (its CPUs over the stage's threads: every
machine under 8 cores with the default `threads`), that worker would take the driver's place on
the same cores after Ray and its own start had cost seconds of them: the driver computes the
stage itself, and a run whose stages all fit that rule never starts Ray (as `datasets.map` with
one process runs in-process). `workers: N` asks for N workers anyway.

The driver reads the input a batch at a time, keeps a few batches in flight per worker, writes
the results in input order (the same shards as the in-process runner, so the output does not
depend on the runner) and counts finished rows for the progress bar. Ray restarts a dead actor
and retries its batch, a bounded number of times; stages are pure functions of their batches,
so a retry is safe.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import uuid
from collections import deque
from pathlib import Path

import pyarrow as pa

from hardneg.pipeline.errors import WorkerError
from hardneg.pipeline.executors import batch_delay_for_tests
from hardneg.pipeline.progress import progress_bar
from hardneg.stages.base import MapStage, local_cpus
from hardneg.stages.io import ShardWriter, count_rows, iter_batches, use_pipeline_allocator

log = logging.getLogger("hardneg")

# Fault tolerance of map stages (tests/test_determinism.py kills a worker mid-stage).
MAX_RESTARTS = 8  # per model worker (actor)
MAX_RETRIES = 8  # per batch
IN_FLIGHT = 2  # batches queued per worker: the next one is there when the current one ends


def _renice(nice: int) -> None:
    """Run at the driver's priority: Ray starts workers at niceness 15, which starves them next
    to any ordinary process. Raising priority back needs privilege a user may lack; then the
    worker stays where Ray put it (a local Ray is started with the driver's niceness anyway)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (OSError, AttributeError):
        pass


class MapWorker:
    """One Ray actor of a pool: runs the batches of every stage of its pool. Stages that share a
    model find it loaded (the stage module's model cache), so the model loads once per worker."""

    def __init__(self, nice: int, warm: MapStage | None = None) -> None:
        _renice(nice)
        use_pipeline_allocator()
        self._stages: dict[str, MapStage] = {}
        if warm is not None:
            try:
                warm.ensure_setup()  # load the model now, while the driver is still ingesting
            except Exception:  # noqa: BLE001 - the stage's own setup raises it again, to the driver
                pass

    def run(self, run_id: str, stage: MapStage, batch):
        if run_id not in self._stages:
            # A new stage: set it up once (a shared model is already loaded). A pool runs one
            # stage at a time, so the previous stage's object can go.
            stage.ensure_setup()
            self._stages = {run_id: stage}
        stage = self._stages[run_id]
        batch_delay_for_tests(stage.name)
        return stage.transform(batch)


def _job_env_vars() -> dict:
    """Inside a Ray job (`ray job submit`), the env vars the job's runtime_env already sets: the
    driver has them, and ray.init refuses to set one of them again."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def _route_ray_logs(log_file: Path | None, verbose: bool) -> None:
    """Ray's Python loggers write to a file in the work dir (stderr too with --log-level debug)."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        if not verbose:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = False
            logger.setLevel(logging.INFO)
    _close_log_file()
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("ray").addHandler(handler)
        _LOG_HANDLERS.append(handler)


_LOG_HANDLERS: list[logging.Handler] = []


def _close_log_file() -> None:
    """Detach the previous run's log file (one process may run several pipelines)."""
    while _LOG_HANDLERS:
        handler = _LOG_HANDLERS.pop()
        logging.getLogger("ray").removeHandler(handler)
        handler.close()


_STOPPING: list[threading.Thread] = []


def _kill_autoscaler_monitor() -> None:
    """A local Ray's autoscaler monitor outlasts the 1 s grace `ray.shutdown` gives each process
    (a whole second of every run's end); a one-node Ray has nothing for it to scale, so it is
    killed first. Private Ray API: where it has moved, shutdown just takes that second."""
    try:
        from ray._private import ray_constants, worker

        for info in worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):  # noqa: SLF001
            info.process.kill()
            info.process.wait(5)
    except Exception:  # noqa: BLE001 - best effort, see above
        pass


def _stop_in_background(release: threading.Event, local: bool) -> None:
    """Stop the local Ray in a thread: its processes take a moment to exit, which the driver
    spends writing the output and the summary. The thread is not a daemon: the process
    does not exit before Ray has stopped. `release` lets the thread that started Ray end, only
    once Ray has stopped (ended earlier, Ray waits seconds on its lost connection)."""

    def stop() -> None:
        import ray

        try:
            if local:
                _kill_autoscaler_monitor()
            ray.shutdown()
        finally:
            release.set()
            _close_log_file()

    thread = threading.Thread(target=stop, name="hardneg-ray-stop")
    thread.start()
    _STOPPING.append(thread)


def _wait_for_stop() -> None:
    while _STOPPING:
        _STOPPING.pop().join()


class _Pool:
    def __init__(self, ray, stage: MapStage, nice: int, warm: bool) -> None:
        res = stage.resources
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # A worker runs `res.num_cpus` threads but reserves one logical CPU, so other pools (and
        # the driver's own reads and writes) are never starved of a slot on a small machine.
        size = res.max_workers or max(1, int(cpus // max(res.num_cpus, 1)))
        if res.num_gpus:
            # Workers beyond what the cluster's GPUs hold would never start, and the batches
            # handed to them would wait for ever (16 CPUs and one GPU: four embedding workers).
            gpus = ray.cluster_resources().get("GPU", 0)
            held = max(1, int(gpus // res.num_gpus))
            if size > held:
                size = held
                log.info("ray: %s runs %d worker%s, as many as the cluster's GPUs (%g) hold",
                         stage.name, size, "" if size == 1 else "s", gpus)
        actor = ray.remote(MapWorker).options(
            num_cpus=1, num_gpus=res.num_gpus or None,
            # A dead worker (killed, OOM, lost node) is restarted and its batches retried; bounded,
            # so a batch that kills every worker it meets fails the run instead of looping.
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_RETRIES,
        )
        self.ray = ray
        self.actors = [actor.remote(nice, stage if warm else None) for _ in range(size)]
        self._starting = [a.__ray_ready__.remote() for a in self.actors]  # resolve once constructed

    def up(self) -> bool:
        """Whether a worker has finished starting (its model loaded, for a warm pool)."""
        if self._starting:
            ready, _ = self.ray.wait(self._starting, num_returns=1, timeout=0)
            if ready:
                self._starting = []
        return not self._starting

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - a worker already gone (its node lost) needs no kill
                pass
        self.actors = []


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, progress: bool = True, log_file: Path | None = None) -> None:
        self.address = address
        self.progress = progress
        self.log_file = Path(log_file) if log_file else None
        self._started = False
        self._pools: dict[tuple, _Pool] = {}
        self._users: dict[tuple, int] = {}  # prepared stages still to run, by pool
        self._nice = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
        # A local start (no cluster to join) runs in the background while the driver works.
        self._local = not address and not os.environ.get("RAY_ADDRESS")
        self._starter: threading.Thread | None = None
        self._up = threading.Event()  # Ray is started (or failed to start: _start_error)
        self._release = threading.Event()  # the starter thread may end (close)
        self._start_error: BaseException | None = None

    def _logs_hint(self) -> str:
        return f"Ray's logs: {self.log_file}" if self.log_file else "Ray's logs: /tmp/ray/session_latest/logs"

    def in_driver(self, stage: MapStage) -> bool:
        """Whether a local run computes `stage` in the driver: no GPU to hand to a worker, no
        worker count asked for, and room on this machine for only one worker of its threads."""
        res = stage.resources
        return (self._local and not res.num_gpus and res.max_workers is None
                and local_cpus() // max(int(res.num_cpus), 1) <= 1)

    def _ensure_ray(self):
        """Ray, started (or joined) and ready: waits for a background start."""
        if self._starter is not None:
            self._up.wait()
            if self._start_error is not None:
                raise self._start_error
        return self._init_ray()

    def _start_in_background(self, warm: list[MapStage]) -> None:
        """Start the local Ray, then the warm pools, in a thread. The thread stays alive until
        close: a Ray started from a thread that then ends loses its connection to its GCS."""

        def start() -> None:
            try:
                ray = self._init_ray()
                for stage in warm:
                    if self._users.get(stage.pool_key(), 0) > 0:  # not already done by the driver
                        self._pool(ray, stage, warm=True)
            except BaseException as err:  # noqa: BLE001 - handed to the driver thread, raised there
                self._start_error = err
            finally:
                self._up.set()
            self._release.wait()

        self._starter = threading.Thread(target=start, name="hardneg-ray-start", daemon=True)
        self._starter.start()

    def _init_ray(self):
        import ray

        _wait_for_stop()  # a previous run's Ray, still stopping in the background
        if not ray.is_initialized():
            verbose = log.isEnabledFor(logging.DEBUG)
            job_env = _job_env_vars()
            env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "HARDNEG_", "TRANSFORMERS_", "OMP_"))
                   and k not in job_env}
            # A local Ray's workers inherit the driver's environment; a cluster's get the
            # variables that matter through the job's runtime env (which costs each worker a
            # setup step, and makes the workers Ray starts ahead unusable for it).
            kwargs = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=verbose,
                          logging_level=logging.DEBUG if verbose else logging.ERROR,
                          runtime_env={"env_vars": env} if env and not self._local else None)
            if self.address:
                try:
                    ray.init(address=self.address, **kwargs)
                except (ConnectionError, TimeoutError, RuntimeError) as err:
                    from hardneg.pipeline.config import ConfigError

                    first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:300]
                    raise ConfigError(f"cannot join the Ray cluster at {self.address}: {first}") from None
            elif os.environ.get("RAY_ADDRESS"):
                ray.init(**kwargs)  # joins that cluster: its workers' settings are its own
            else:
                self._start_local(ray, kwargs)
            self._started = True
            if self.log_file is not None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
            _route_ray_logs(self.log_file, verbose)
            self._note_session(ray)
            log.info("ray: %s", "joined " + self.address if self.address else "started a local Ray")
        return ray

    def _start_local(self, ray, kwargs: dict) -> None:
        """Start a local Ray, its workers at the driver's niceness (not Ray's default 15). Ray
        gives its raylet a fixed 30 s to register; on a machine busy with other work that can
        pass, so a start that timed out is tried again (twice) before the run gives up."""
        for attempt in range(3):
            try:
                ray.init(_system_config={"worker_niceness": self._nice}, **kwargs)
                return
            except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
                if "timed out during startup" not in str(err) or attempt == 2:
                    raise
                ray.shutdown()
                log.debug("ray: the local start timed out; trying again")

    def _note_session(self, ray) -> None:
        try:
            session = ray._private.worker._global_node.get_session_dir_path()  # noqa: SLF001
        except AttributeError:
            session = "unknown"
        logging.getLogger("ray").info("ray session (its processes' own logs): %s/logs", session)

    def prepare(self, stages: list[MapStage]) -> None:
        """Start the pools of the model stages this run will compute, before they are needed:
        their workers import torch and load the model while the driver ingests."""
        in_driver = [s.name for s in stages if s.stateful and self.in_driver(s)]
        model_stages = [s for s in stages if s.stateful and s.name not in in_driver]
        if in_driver:
            log.info("ray: %s run here: %d CPUs hold one worker of their threads, no more "
                     "(`--set workers=N` puts N on Ray)", ", ".join(in_driver), local_cpus())
        if not model_stages:
            return
        for stage in model_stages:
            self._users[stage.pool_key()] = self._users.get(stage.pool_key(), 0) + 1
        # Of the pools whose workers hold GPUs only the first starts ahead; the others start when
        # their stage runs, once the earlier ones have closed. Started together, a later stage's
        # workers could take the GPU an earlier stage waits for, and the run would never end.
        first_gpu_pool = next((s.pool_key() for s in model_stages if s.resources.num_gpus), None)
        warm = [s for s in model_stages if not s.resources.num_gpus or s.pool_key() == first_gpu_pool]
        if self._local and self._starter is None:
            # Copies, taken before any setup: the starter thread pickles them for the workers
            # while the driver may be setting up (and mutating) the stage objects themselves.
            self._start_in_background([copy.copy(s) for s in warm])
            return
        ray = self._ensure_ray()
        for stage in warm:
            self._pool(ray, stage, warm=True)

    def _pool(self, ray, stage: MapStage, warm: bool = False) -> _Pool:
        key = stage.pool_key()
        if key not in self._pools:
            self._pools[key] = _Pool(ray, stage, self._nice, warm)
        return self._pools[key]

    def run_map(self, stage: MapStage, input_dir: Path, out_dir: Path) -> int:
        key = stage.pool_key()
        try:
            return self._drive(stage, input_dir, out_dir)
        finally:
            stage.release()  # what the driver loaded to help with the batches
            if self._users.get(key, 0) > 0:
                self._users[key] -= 1
            if self._users.get(key, 0) <= 0 and key in self._pools:
                # No later stage of this run needs these workers: free their CPUs.
                self._pools.pop(key).close()

    def _workers(self, stage: MapStage, wait: bool):
        """(ray, the stage's pool) once its workers are up; None while a local start is still
        under way and `wait` is false (the driver computes the batch itself meanwhile)."""
        if not wait and not self._up.is_set():
            if self._starter is None:  # no model stage started it: start it now, for the next batches
                self._start_in_background([])
            return None
        ray = self._ensure_ray()
        pool = self._pool(ray, stage)
        return (ray, pool) if wait or pool.up() else None

    def _drive(self, stage: MapStage, input_dir: Path, out_dir: Path) -> int:
        run_id = uuid.uuid4().hex
        # The driver helps only a local start (on a cluster it may be a small machine), and not
        # with a stage that needs a GPU (the workers hold them).
        helping = self._local and not stage.resources.num_gpus
        total = count_rows(input_dir)
        # One batch, and no workers of its pool started: they would start for nothing. Or room
        # for one worker only, which would replace the driver at the cost of its start.
        alone = helping and (self.in_driver(stage) or (total <= stage.resources.batch_size
                                                       and stage.pool_key() not in self._pools))
        if alone:  # as the in-process runner computes it (its `local_batches` included)
            from hardneg.pipeline.executors.local import compute_in_process

            return compute_in_process(stage, input_dir, out_dir, self.progress, total)
        workers, stage_ref = None, None
        pending: deque = deque()  # in input order: a worker's result ref, or a table made here
        with ShardWriter(out_dir) as writer, progress_bar(stage.name, total, self.progress) as bar:
            for i, batch in enumerate(iter_batches(input_dir, stage.resources.batch_size)):
                if workers is None:
                    workers = self._workers(stage, wait=not helping)
                if workers is None:
                    batch_delay_for_tests(stage.name)
                    pending.append(stage(batch))
                else:
                    ray, pool = workers
                    stage_ref = stage_ref or ray.put(stage)
                    pending.append(pool.actors[i % len(pool.actors)].run.remote(run_id, stage_ref, batch))
                window = IN_FLIGHT * len(workers[1].actors) if workers else 0
                while pending and (len(pending) >= window or isinstance(pending[0], pa.Table)):
                    self._collect(stage, pending.popleft(), writer, bar)
            while pending:
                self._collect(stage, pending.popleft(), writer, bar)
        return writer.rows

    def _collect(self, stage: MapStage, item, writer: ShardWriter, bar) -> None:
        if isinstance(item, pa.Table):  # computed in the driver
            writer.write(item)
            bar.update(item.num_rows)
            return
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        try:
            table = ray.get(item)
        except RayTaskError as err:
            # The stage's own exception is the cause: a user error in it (a model that cannot
            # load, bad input) still ends the run in one line (pipeline/errors.py follows causes).
            cause = getattr(err, "cause", None)
            cause = cause if isinstance(cause, Exception) and not isinstance(cause, RayError) else None
            what = f"{cause.__class__.__name__}: {cause}" if cause is not None else str(err)
            raise WorkerError(f"{stage.name} failed on a Ray worker ({self._logs_hint()}): "
                              f"{(what.strip().splitlines() or [''])[0][:300]}") from cause
        except RayActorError as err:
            raise WorkerError(f"{stage.name}: a Ray worker died and was restarted {MAX_RESTARTS} times, or its node "
                              f"was lost ({self._logs_hint()}): {(str(err).strip().splitlines() or [''])[0][:300]}") from None
        writer.write(table)
        bar.update(table.num_rows)

    def close(self) -> None:
        if self._starter is not None:
            self._up.wait()  # a start still under way (an interrupted run) is let finish, then stopped
        for pool in self._pools.values():
            try:
                pool.close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        self._pools = {}
        if self._started:
            _stop_in_background(self._release, self._local)
            self._started = False
        else:
            self._release.set()
        self._starter = None
        self._up.clear()
        self._release = threading.Event()
        self._start_error = None
        self._users = {}
