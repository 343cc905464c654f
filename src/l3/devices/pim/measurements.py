"""The surrogate's engine measurements kept on disk, shared by every process on the machine.

The surrogate's pieces (surrogate.py) are a pure function of one rank's DRAM timing and organisation, the PU
spec, the model's share of heads and the code that measures them. Measuring them runs the command-level engine
hundreds of times (seconds to a minute per configuration), so they are kept in an SQLite file in the cache
folder (`l3.cache`, `pim-measurements.sqlite`), keyed by a hash of the specs' JSON and of the source of every
module the measurement runs: an edit to any of them misses and measures afresh. A stored value is the float64
array the engine produced, so a run reads exactly what it would have measured. SQLite's locking lets study
workers and Ray tasks on one machine share the file. `L3_PIM_STORE` names another file, or `off` turns the
store off; a store that cannot be opened is skipped with a warning (the surrogate then measures in memory).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sqlite3
import warnings
from pathlib import Path

import numpy as np

from l3.cache import cache_dir

STORE_ENV = "L3_PIM_STORE"
FILE_NAME = "pim-measurements.sqlite"
# Modules whose code decides a measurement's value: the engine, the kernels' command streams, the geometry, the
# surrogate's measuring code and the specs' derived quantities.
MEASURING_MODULES = ("l3.devices.pim.timing", "l3.devices.pim.kernels", "l3.devices.pim.commands",
                     "l3.devices.pim.geometry", "l3.devices.pim.surrogate", "l3.specs.dram",
                     "l3.specs.pim")  # fmt: skip


@functools.cache
def code_fingerprint() -> str:
    """Hash of the source of MEASURING_MODULES (read once per process)."""
    h = hashlib.sha256()
    for name in MEASURING_MODULES:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


class MeasurementStore:
    """Named float64 arrays under one key (a configuration) in the shared SQLite file."""

    def __init__(self, key: str, path: Path | None = None):
        self.key = hashlib.sha256(f"{key}|{code_fingerprint()}".encode()).hexdigest()
        self.path = path or cache_dir() / FILE_NAME
        self._db: sqlite3.Connection | None = None

    @classmethod
    def open(cls, key: str) -> MeasurementStore | None:
        """The store for `key` in the file `L3_PIM_STORE` names (default: the cache folder's), or None where it
        is `off` or the file cannot be opened."""
        where = os.environ.get(STORE_ENV, "")
        if where.lower() == "off":
            return None
        store = cls(key, Path(where) if where else None)
        try:
            store._connect()
        except (OSError, sqlite3.Error) as e:
            warnings.warn(f"{store.path}: PIM measurement store unavailable ({e}); measuring in memory", stacklevel=2)
            return None
        return store

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=60.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")  # a cache: a lost write is measured again
            db.execute("CREATE TABLE IF NOT EXISTS measurement (key TEXT, item TEXT, value BLOB, "
                       "PRIMARY KEY (key, item))")  # fmt: skip
            self._db = db
        return self._db

    def load(self) -> dict[str, np.ndarray]:
        """Every array stored under this key, by item name."""
        rows = self._connect().execute("SELECT item, value FROM measurement WHERE key = ?", (self.key,))
        return {item: np.frombuffer(value, dtype=np.float64).copy() for item, value in rows}

    def put(self, item: str, value: np.ndarray) -> None:
        """Store `value` (float64) as `item` (a concurrent writer of the same item wrote the same value)."""
        db = self._connect()
        with db:
            db.execute("INSERT OR IGNORE INTO measurement VALUES (?, ?, ?)",
                       (self.key, item, np.asarray(value, dtype=np.float64).tobytes()))  # fmt: skip
