"""Fuzz every input loader for longer than the test suite does (tests/fuzz.py: strategies and checks).

Each loader gets N generated files (malformed and adversarial trace CSV/JSONL, config.json and system TOML); a
file must give a valid result or the project's error, never another exception, never a lost row or request.
Prints a table: examples tried per loader, how many were refused with the project's error, and the time.
Usage: python bench/fuzz_loaders.py [--examples 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fuzz import LOADERS
from l3.errors import L3Error


def run(name: str, n: int, folder: Path) -> tuple[int, float]:
    strategy, fname, check = LOADERS[name]
    count = [0]

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(drawn=strategy)
    def one(drawn):
        count[0] += 1
        text, *rows = drawn if isinstance(drawn, tuple) else (drawn,)
        path = folder / fname
        path.write_text(text)
        check(path, *rows)

    t0 = time.perf_counter()
    one()
    return count[0], time.perf_counter() - t0


def refused_share(name: str, n: int, folder: Path) -> float:
    """Of n fresh examples, the share the loader refused with the project's error (the rest loaded)."""
    strategy, fname, _ = LOADERS[name]
    from l3.specs.model import get_model
    from l3.specs.system import get_system
    from l3.workload import load_workload

    load = {"config.json": get_model, "system TOML": get_system}.get(name, load_workload)
    refused = [0]

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(drawn=strategy)
    def one(drawn):
        path = folder / fname
        path.write_text(drawn[0] if isinstance(drawn, tuple) else drawn)
        try:
            load(str(path))
        except L3Error:
            refused[0] += 1

    one()
    return refused[0] / n


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per loader")
    args = ap.parse_args()
    print("| loader | examples | refused with the project's error | other exceptions | time |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in LOADERS:
            n, dt = run(name, args.examples, Path(tmp))
            m = min(args.examples, 500)
            share = refused_share(name, m, Path(tmp))
            print(f"| {name} | {n} | {share:.0%} (of {m} more) | 0 | {dt:.1f} s |", flush=True)
