"""Where a sweep's runs execute: in this process, as local processes, or as SLURM jobs, through submitit.

    --executor=inline   one after another in this process (the default): compiled programs are shared
                        through JAX's persistent cache, and a preemption notice stops at a boundary
    --executor=local    each task a process of its own, started by submitit's local executor,
                        at most --parallel at a time (what the tests use: the same pickling and
                        job folders as a cluster, on one machine)
    --executor=slurm    each task a SLURM job (--slurm_partition, --slurm_gpus, --slurm_time, --slurm_cpus);
                        submitit requeues a job SLURM preempts or times out, and the run resumes from its
                        last checkpoint

A task is a module-level function and its arguments; it returns True when its work is done and False
when a preemption notice stopped it (saved, to resume). Every task's work lands in the sweep's workdir,
so whatever ran where, the coordinator reads the results from there, and the same command run again
does only what is missing. submitit keeps each job's pickles and logs under `<sweep dir>/jobs/`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("xfer")

EXECUTORS = ("inline", "local", "slurm")
_POLL_SECONDS = 2.0


class DispatchError(RuntimeError):
    """A task failed in a job: one line naming it and its log."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # what the logs and errors call it, e.g. "final full seed=1"
    function: Callable[..., bool]  # module-level, so that submitit pickles it by reference
    args: tuple


@dataclasses.dataclass(frozen=True)
class Executor:
    kind: str  # one of EXECUTORS
    folder: Path  # submitit's job folder (pickles, stdout, stderr)
    parallel: int = 1  # local: tasks running at once; slurm: the array's parallelism
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)  # partition, gpus, time (min), cpus

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"--executor={self.kind}; choose one of {', '.join(EXECUTORS)}")
        if self.parallel < 1:
            raise ValueError(f"--parallel={self.parallel}; it must be at least 1")

    def run(self, tasks: Sequence[Task]) -> bool:
        """Runs every task; False if a preemption notice stopped one (inline: the rest are not started).
        Raises DispatchError, after every job ended, if any failed."""
        if not tasks:
            return True
        if self.kind == "inline":
            for index, task in enumerate(tasks, start=1):
                log.info("task %d/%d: %s", index, len(tasks), task.name)
                if not task.function(*task.args):
                    return False
            return True
        return self._run_jobs(tasks)

    def _run_jobs(self, tasks: Sequence[Task]) -> bool:
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.kind)
        if self.kind == "slurm":
            executor.update_parameters(
                slurm_partition=self.slurm.get("partition") or None, gpus_per_node=self.slurm.get("gpus", 0),
                timeout_min=self.slurm.get("time", 60), cpus_per_task=self.slurm.get("cpus", 8),
                slurm_array_parallelism=self.parallel, name="xfer")
            with executor.batch():  # one job array
                jobs = [executor.submit(_Job(task)) for task in tasks]
            pending = list(zip(tasks, jobs))
        else:
            pending = self._local_pool(executor, tasks)
        return _results(pending)

    def _local_pool(self, executor, tasks: Sequence[Task]) -> list:
        """Local jobs, at most `parallel` running at once (the local executor starts all it is given)."""
        started, queue = [], list(tasks)
        while queue:
            running = [job for _, job in started if not job.done()]
            while queue and len(running) < self.parallel:
                task = queue.pop(0)
                job = executor.submit(_Job(task))
                log.info("job %s: %s (log %s)", job.job_id, task.name, job.paths.stderr)
                started.append((task, job))
                running.append(job)
            if queue:
                time.sleep(_POLL_SECONDS)
        return started


def _results(pending: list) -> bool:
    failures, complete = [], True
    for task, job in pending:
        try:
            complete &= bool(job.result())
        except Exception as error:  # submitit's FailedJobError or UncompletedJobError: the job's log says why
            last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            failures.append(f"{task.name} (job {job.job_id}: {last}; log {job.paths.stderr})")
    if failures:
        raise DispatchError(f"{len(failures)} of {len(pending)} job(s) failed: {'; '.join(failures)}; fix the "
                            "cause and rerun the same command: finished work is kept")
    return complete


class _Job:
    """A task as submitit runs it in another process, with the coordinator's log format; requeued
    (submitit's `checkpoint`) when SLURM preempts or times it out. The environment (XLA_FLAGS,
    JAX_COMPILATION_CACHE_DIR) is the coordinator's: local jobs inherit it, sbatch exports it."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(self) -> bool:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
        logging.getLogger("absl").setLevel(logging.WARNING)
        log.info("%s", self.task.name)
        return self.task.function(*self.task.args)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def train_run(config, workdir: str) -> bool:
    """A task: one run of `xfer.training.train` (started, or resumed from its checkpoint)."""
    from xfer.training import train

    return train.run(config, workdir) is not None
