"""Ray's overhead per sweep point: the same points run directly (one process, one after another) and as Ray tasks
on a local instance with one CPU (so the tasks also run one after another). Prints a table; docs/benchmarks.md
records the figures.

    python bench/bench_sweep.py [--spec examples/sweep-l3.toml] [--points 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from l3.sweep.run import evaluate, run_points
from l3.sweep.spec import load_sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", type=Path, default=Path("examples/sweep-l3.toml"))
    ap.add_argument("--points", type=int, default=8, help="the spec's first N points")
    args = ap.parse_args()
    points = load_sweep(args.spec).points()[: args.points]

    t0 = time.perf_counter()
    direct = [evaluate(p) for p in points]
    direct_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            t0 = time.perf_counter()
            run_points(points, Path(tmp) / "r.parquet")
            ray_s = time.perf_counter() - t0
        finally:
            ray.shutdown()
    inside = sum(r["point_wall_s"] for r in direct)
    print("| points | direct: total s | per point s | Ray (1 CPU): total s | per point s | overhead per point |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(points)} | {direct_s:.1f} | {direct_s / len(points):.2f} | {ray_s:.1f} | {ray_s / len(points):.2f} "
          f"| {(ray_s - direct_s) / len(points):.2f} s = {ray_s / direct_s - 1:+.1%} |")
    print(f"(simulation time inside the points: {inside:.1f} s)")


if __name__ == "__main__":
    main()
