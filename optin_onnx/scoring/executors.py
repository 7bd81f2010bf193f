"""Where the candidate runs of the exact scorers execute: in this process, in a pool of local
processes, or on a Ray cluster.

The scorers (:mod:`~optin_onnx.scoring.fast`, :mod:`~optin_onnx.scoring.masked`) split their work
into a :class:`Job` (everything a candidate run reads: the model, the cached dense activations, the
teacher side of the loss) and many small tasks (one block's batch of candidate sets). Tasks of
different blocks, and of one block, are independent, so they may run anywhere and in any order;
results come back in task order, so every executor returns exactly the numbers the serial loop
does (the candidate arithmetic is the same code; only onnxruntime's thread count differs).

- ``local``: the tasks in order, in this process (onnxruntime's own thread pool uses the cores).
- ``processes``: a pool of ``workers`` spawned processes, each holding one copy of the job, each
  session with ``cores // workers`` intra-op threads so the pool does not oversubscribe the
  machine.
- ``ray``: the job put once in Ray's object store, one Ray task per candidate batch, each asking
  for as many CPUs as it runs onnxruntime threads; a task lost with its worker is retried, and
  progress advances as tasks finish. Ray is an optional dependency, imported only here.

What moves per task is the task (block index and unit indices) out and two floats per candidate
back; the job moves once per worker process (docs/DESIGN.md, "Scoring on many cores and machines").
"""
from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Protocol

import numpy as np

from optin_onnx.analysis import Block, Structure
from optin_onnx.calibrate import CalibrationSet
from optin_onnx.errors import OptinError
from optin_onnx.runtime import heap_kept, keep_freed_heap, one_blas_thread
from optin_onnx.scoring.candidates import spread
from optin_onnx.scoring.suffix import SuffixSessions
from optin_onnx.scoring.teacher import Objective
from optin_onnx.scoring.types import EXECUTORS, Captured, ExecutorConfig, Scores

#: One task: (block index, the candidate sets to score, each a unit-index array).
Task = tuple[int, list[np.ndarray]]
#: Per candidate of a task: L_MD [candidates] and L_KD [candidates, objective outputs] added to
#: the base loss.
Result = tuple[np.ndarray, np.ndarray]
#: Called with the number of units a finished task scored.
Done = Callable[[int], None]

#: Retries Ray makes of a task whose worker process died (out of memory, a lost node).
RAY_RETRIES = 3


class Job(Protocol):
    """Everything a task reads; picklable, and sent once to each worker process."""

    def run(self, task: Task, threads: int | None) -> Result:
        """Score one task's candidates with ``threads`` onnxruntime intra-op threads (None:
        onnxruntime's default, every core)."""
        ...


@dataclass
class SuffixJob:
    """What both exact scorers' jobs hold: one block's suffix at a time, the calibration chunks,
    the cached values the suffixes read, the teacher side of the loss and, per block, the loss
    scores are measured from. Each scorer adds what its candidate runs need."""

    suffixes: SuffixSessions
    cal: CalibrationSet
    dense: Captured
    obj: Objective
    base_loss: dict[str, np.ndarray]  # per block, laid out as Objective.loss returns it


def gather(structure: Structure, tasks: Sequence[Task], results: Sequence[Result],
           sets_of: dict[str, list[np.ndarray]], proxies: dict[str, np.ndarray | None],
           started: float, lam: float, n_outputs: int) -> Scores:
    """The per-unit scores from every task's per-candidate results (tasks of a block cover its
    candidate sets in order; L_KD has ``n_outputs`` columns), timed from ``started``
    (``time.perf_counter``)."""
    md: dict[str, list[np.ndarray]] = {b.name: [] for b in structure.blocks}
    kd: dict[str, list[np.ndarray]] = {b.name: [] for b in structure.blocks}
    for (index, _), (task_md, task_kd) in zip(tasks, results):
        name = structure.blocks[index].name
        md[name].append(task_md)
        kd[name].append(task_kd)

    def per_unit(parts: list[np.ndarray], b: Block, empty: np.ndarray) -> np.ndarray:
        return spread(np.concatenate(parts) if parts else empty, sets_of[b.name],
                      proxies[b.name], b.n_units)

    return Scores(md={b.name: per_unit(md[b.name], b, np.zeros(0)) for b in structure.blocks},
                  kd={b.name: per_unit(kd[b.name], b, np.zeros((0, n_outputs)))
                      for b in structure.blocks},
                  seconds=time.perf_counter() - started).finalize(lam)


def holders(config: ExecutorConfig) -> int:
    """How many processes on this machine hold a copy of the scoring job: this one, plus each
    worker of a local pool or of a Ray instance started here (a cluster's workers use its own
    machines' memory)."""
    if config.kind == "local" or (config.kind == "ray" and config.ray_address):
        return 1
    return 1 + (config.workers or cores())


def stated_workers(config: ExecutorConfig) -> int | str | None:
    """The worker count a report states: the one asked for, or the pool's default (one process
    per core; one Ray task per cluster CPU, known only once Ray has started); None for ``local``,
    which runs no workers."""
    if config.kind == "local":
        return None
    if config.workers is not None:
        return config.workers
    return cores() if config.kind == "processes" else "one per cluster CPU"


def units_in(task: Task) -> int:
    return sum(len(units) for units in task[1])


def cores() -> int:
    """The cores this process may run on (the affinity mask, which a container or ``taskset``
    narrows, rather than the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_tasks(job: Job, tasks: Sequence[Task], config: ExecutorConfig,
              done: Done | None = None) -> list[Result]:
    """Every task's result, in task order, from the executor ``config`` names."""
    if config.kind not in EXECUTORS:
        raise OptinError(f"--executor must be one of {', '.join(EXECUTORS)}, got '{config.kind}'")
    if config.workers is not None and config.workers < 1:
        raise OptinError(f"--workers must be at least 1, got {config.workers}")
    if not tasks:
        return []
    if config.kind == "processes":
        return _processes(job, tasks, config.workers or cores(), done)
    if config.kind == "ray":
        return _ray(job, tasks, config, done)
    out = []
    with heap_kept(), one_blas_thread():
        for task in tasks:
            out.append(job.run(task, None))
            if done:
                done(units_in(task))
    return out


# -- processes ------------------------------------------------------------------------------------

_worker_job: Job | None = None


def _init_worker(payload: bytes) -> None:
    global _worker_job
    keep_freed_heap()  # the worker's process exists for the job's runs
    _worker_job = pickle.loads(payload)


def _run_in_worker(task: Task, threads: int) -> Result:
    assert _worker_job is not None, "the pool initializer sets the job"
    return _worker_job.run(task, threads)


#: Thread pools of the numerical libraries a worker loads: one thread each, as in the local loop
#: (:func:`~optin_onnx.runtime.one_blas_thread`); set in the environment, the pools never start.
_LIBRARY_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Variables set while worker processes are spawned (they inherit the environment at start)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _processes(job: Job, tasks: Sequence[Task], workers: int, done: Done | None) -> list[Result]:
    """Spawned (not forked) workers: forking a process whose onnxruntime and BLAS thread pools
    are running can deadlock the child."""
    workers = min(workers, len(tasks))
    threads = max(1, cores() // workers)
    payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    out: list[Result | None] = [None] * len(tasks)
    try:
        with _environment({k: "1" for k in _LIBRARY_THREADS}), ProcessPoolExecutor(
                workers, mp_context=get_context("spawn"), initializer=_init_worker,
                initargs=(payload,)) as pool:
            futures = {pool.submit(_run_in_worker, task, threads): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                i = futures[future]
                out[i] = future.result()
                if done:
                    done(units_in(tasks[i]))
    except BrokenProcessPool as exc:
        raise OptinError("a scoring worker process died (out of memory?); try fewer --workers "
                         "or --executor local") from exc
    return out  # type: ignore[return-value]


# -- ray ------------------------------------------------------------------------------------------

_ray_job: tuple[str, Job] | None = None  # (object id, job): the one job this Ray worker holds


def _run_on_ray(boxed: list[Any], task: Task, threads: int) -> Result:
    """A Ray task. The job's reference comes boxed in a list, so Ray does not fetch and unpickle
    the job for every task: a worker fetches it once and keeps it for the tasks that follow."""
    import ray

    global _ray_job
    ref = boxed[0]
    if _ray_job is None or _ray_job[0] != ref.hex():
        keep_freed_heap()  # a Ray worker process runs its tasks and nothing of the caller's
        one_blas_thread()
        _ray_job = (ref.hex(), ray.get(ref))
    return _ray_job[1].run(task, threads)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptinError("--executor ray needs Ray: pip install 'optin-onnx[distributed]'") from None
    return ray


def _ray(job: Job, tasks: Sequence[Task], config: ExecutorConfig, done: Done | None
         ) -> list[Result]:
    ray = _import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = config.ray_address or "a local Ray instance"
            raise OptinError(f"cannot start Ray at {where}: {str(exc).splitlines()[0]}") from exc
    total = int(ray.cluster_resources().get("CPU", 1))
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]),
                  default=1)
    workers = min(config.workers or total, len(tasks))
    threads = max(1, min(largest, total // workers))
    remote = ray.remote(_run_on_ray).options(num_cpus=threads, max_retries=RAY_RETRIES)
    boxed = [ray.put(job)]
    pending = {remote.remote(boxed, task, threads): i for i, task in enumerate(tasks)}
    out: list[Result | None] = [None] * len(tasks)
    try:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                i = pending.pop(ref)
                out[i] = ray.get(ref)
                if done:
                    done(units_in(tasks[i]))
    except ray.exceptions.RayError as exc:
        for ref in pending:
            ray.cancel(ref)
        raise OptinError(f"a Ray scoring task failed after {RAY_RETRIES} retries: "
                         f"{str(exc).splitlines()[0]}") from exc
    return out  # type: ignore[return-value]
