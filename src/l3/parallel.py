"""The one process pool for independent simulations run side by side (a comparison's systems, a study's runs,
the parallelism probe's candidates).

Workers are spawned (not forked): they share nothing with the parent but the PIM measurement store, which SQLite
locks across processes. Work goes out one item at a time, in the order given (callers put the longest first).
Inside a pool worker (a daemonic process, which may not start children) the map runs in the worker itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from typing import Any

Mapper = Callable[[Callable[[Any], Any], list], list]


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def process_map(jobs: int) -> Iterator[Mapper]:
    """A `map(fn, items) -> list` (results in item order) on `jobs` spawned processes, kept for the block; in
    this process where `jobs` <= 1 or this process is itself a pool worker."""
    if jobs <= 1 or mp.current_process().daemon:
        yield lambda fn, items: [fn(x) for x in items]
        return
    with mp.get_context("spawn").Pool(jobs) as pool:
        yield lambda fn, items: pool.map(fn, items, chunksize=1)
