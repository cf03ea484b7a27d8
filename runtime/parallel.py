"""Work split over spawned processes (spawn: no forked torch or ZeroMQ state), closed down cleanly."""

from __future__ import annotations

import multiprocessing as mp


def _call(task: tuple):
    function, args = task
    return function(*args)


def starmap_processes(function, jobs: list[tuple], workers: int | None = None, progress: str | None = None) -> list:
    """`function(*job)` for each job on `workers` processes (default: one per job), results in job order;
    `progress` names a tqdm bar that advances as jobs finish."""
    from tqdm import tqdm

    pool = mp.get_context("spawn").Pool(workers or len(jobs))
    try:
        results = pool.imap(_call, [(function, job) for job in jobs])
        results = list(tqdm(results, total=len(jobs), desc=progress, unit="job", disable=progress is None))
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()  # the workers exit on their own (terminating them leaks their semaphores)
    pool.join()
    return results
