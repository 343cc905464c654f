"""The one process pool for independent simulations run side by side (a comparison's systems, a study's runs,
the parallelism probe's candidates).

`jobs` processes share the work: this one and jobs - 1 spawned workers. Workers are spawned (not forked): they
share nothing with the parent but the PIM measurement store, which SQLite locks across processes. The workers
take items in the order given (callers put the longest first); this process runs the first item itself, then
takes from the back the items no worker has started, so it does not sit idle while they run (and it does not pay
a worker's start-up and imports). Inside a pool worker the map runs in the worker itself (no nested pools).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

Mapper = Callable[[Callable[[Any], Any], list], list]
_in_worker = False  # set in a pool's worker processes


def _mark_worker() -> None:
    global _in_worker
    _in_worker = True


def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def process_map(jobs: int) -> Iterator[Mapper]:
    """A `map(fn, items) -> list` (results in item order) on `jobs` processes, this one among them, kept for the
    block; in this process alone where `jobs` <= 1 or this process is itself a pool worker."""
    if jobs <= 1 or _in_worker or mp.current_process().daemon:
        yield lambda fn, items: [fn(x) for x in items]
        return
    pool = ProcessPoolExecutor(jobs - 1, mp_context=mp.get_context("spawn"), initializer=_mark_worker)
    try:
        yield lambda fn, items: _shared_map(pool, fn, list(items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _shared_map(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], items: list) -> list:
    """fn over items on the pool's workers and this process, as the module says."""
    if not items:
        return []
    futures: list[Future] = [pool.submit(fn, x) for x in items[1:]]
    results = [fn(items[0])] + [None] * len(futures)
    for i in reversed(range(len(futures))):
        if futures[i].cancel():  # no worker has started it: run it here
            results[i + 1] = fn(items[i + 1])
    for i, f in enumerate(futures):
        if not f.cancelled():
            results[i + 1] = f.result()
    return results
