"""Work split over spawned processes (spawn: no forked torch or ZeroMQ state), closed down cleanly."""

from __future__ import annotations

import multiprocessing as mp


def starmap_processes(function, jobs: list[tuple]) -> list:
    """`function(*job)` for each job, one process per job, results in job order."""
    pool = mp.get_context("spawn").Pool(len(jobs))
    try:
        results = pool.starmap(function, jobs)
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()  # the workers exit on their own (terminating them leaks their semaphores)
    pool.join()
    return results
