"""Where L3 keeps what it builds or measures once per machine: $L3_CACHE_DIR, default ~/.cache/l3."""

import os
from pathlib import Path

CACHE_ENV = "L3_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "l3"))
