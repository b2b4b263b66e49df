"""Where a batch runs: a Dask ``LocalCluster`` on this machine (default), an existing Dask scheduler
(``--scheduler tcp://host:8786``), or SLURM through ``dask-jobqueue`` (``pip install medil[cluster]``).

Each scan is one Dask task. A worker process runs one scan at a time with ``threads`` torch
threads; a worker that dies has its scan run again elsewhere, at most ``retries`` times (Dask's
``allowed-failures``), after which the scan is recorded as failed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import MedILError

#: what a worker process holds besides the task's own memory limit (interpreter, torch, Dask)
WORKER_OVERHEAD_GB = 1.0


def total_memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def default_workers(threads: int, task_memory_gb: float) -> int:
    """Workers that fit this machine: its cores by ``threads``, and 80 % of its memory by what one scan needs."""
    cores = os.cpu_count() or 1
    by_memory = int(0.8 * total_memory_gb() // (task_memory_gb + WORKER_OVERHEAD_GB))
    return max(1, min(cores // max(1, threads), by_memory))


@dataclass
class SlurmResources:
    queue: str | None = None
    account: str | None = None
    walltime: str = "02:00:00"
    job_extra: tuple[str, ...] = ()


def check_cluster_options(scheduler: str, workers: int | None, threads: int, retries: int) -> None:
    """Refuse bad cluster settings before anything is written or started."""
    if retries < 0 or retries > 10:
        raise MedILError(f"retries must be 0 to 10, not {retries}", options=("retries",))
    if threads < 1 or threads > 256:
        raise MedILError(f"threads per worker must be 1 to 256, not {threads}", options=("threads_per_worker",))
    if workers is not None and (workers < 1 or workers > 10000):
        raise MedILError(f"workers must be 1 to 10000, not {workers}", options=("workers",))
    if scheduler == "slurm":
        try:
            import dask_jobqueue  # noqa: F401
        except ImportError:
            raise MedILError(
                "--scheduler slurm needs dask-jobqueue: pip install 'medil-backend[cluster]' (or pip install dask-jobqueue)",
                options=("scheduler",),
            ) from None
    elif scheduler != "local" and "://" not in scheduler and ":" not in scheduler:
        raise MedILError(
            f"--scheduler {scheduler!r} is not local, slurm or a scheduler address such as tcp://host:8786", options=("scheduler",)
        )


class Cluster:
    """A Dask client and, for clusters this run started, the cluster (closed with :meth:`close`)."""

    def __init__(
        self,
        scheduler: str = "local",
        workers: int | None = None,
        threads: int = 1,
        task_memory_gb: float = 3.0,
        retries: int = 2,
        slurm: SlurmResources | None = None,
    ) -> None:
        import dask
        from distributed import Client

        check_cluster_options(scheduler, workers, threads, retries)
        # a worker that dies mid-scan: its scan is run again, at most `retries` times in all
        dask.config.set({"distributed.scheduler.allowed-failures": int(retries)})
        worker_memory = f"{task_memory_gb + WORKER_OVERHEAD_GB:.2f}GiB"
        self.cluster = None
        self.kind = scheduler
        if scheduler == "local":
            from distributed import LocalCluster

            n = workers or default_workers(threads, task_memory_gb)
            self.cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,  # one scan at a time per worker; torch uses `threads` inside it
                processes=True,
                memory_limit=worker_memory,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self.client = Client(self.cluster)
            self.workers = n
        elif scheduler == "slurm":
            from dask_jobqueue import SLURMCluster

            res = slurm or SlurmResources()
            self.cluster = SLURMCluster(
                cores=threads,
                processes=1,
                memory=worker_memory,
                queue=res.queue,
                account=res.account,
                walltime=res.walltime,
                job_extra_directives=list(res.job_extra),
            )
            self.workers = workers or 1
            self.cluster.scale(jobs=self.workers)
            self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(scheduler, timeout="20s")
            except (OSError, ValueError, TimeoutError) as exc:
                raise MedILError(
                    f"cannot reach the Dask scheduler at {scheduler} ({exc}); start it (dask scheduler) or use --scheduler local",
                    options=("scheduler",),
                ) from None
            self.workers = len(self.client.scheduler_info().get("workers", {})) or (workers or 1)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


__all__ = ["Cluster", "SlurmResources", "check_cluster_options", "default_workers"]
