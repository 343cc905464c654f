"""Simulator speed and memory: the paper-scale offline run and online replays of growing size.

Prints two tables (markdown). Usage: python bench/bench_simulator.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time

from l3.report.summary import summarize
from l3.run import simulate
from l3.specs.model import get_model
from l3.specs.system import get_system
from l3.workload import load_workload


def one_run(args: tuple[str, str, str, int, str | None]) -> dict:
    """Run in a fresh process so peak RSS is this run's alone."""
    system, model, workload, n, mode = args
    t0 = time.perf_counter()
    wl = load_workload(workload, n_requests=n, seed=0, mode=mode)
    res = simulate(get_system(system), get_model(model), wl)  # the file's parallelism: auto, probes included
    s = summarize(res)
    s["total_wall_s"] = time.perf_counter() - t0
    s["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return s


def run_isolated(*args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(one_run, (args,))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller replay sizes")
    opts = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {mp.cpu_count()} cores, Python "
          f"{platform.python_version()}")  # fmt: skip
    print("\n### Paper-scale offline runs (gpu-only, 1,000 OpenR1-like requests, parallelism auto: wall includes "
          "the probes)\n")
    print("| model | TP x DP | completed | rejected | output tokens | throughput (tok/s) | mean batch | TBT p50 (s) "
          "| simulated (s) | wall (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in ("opt-66b", "qwen-72b", "gpt-175b"):
        s = run_isolated("gpu-only", model, "openr1", 1000, None)
        d = s["deployment"]
        print(f"| {model} | {d['tp']} x {d['dp']} | {s['requests_completed']} | {s['requests_rejected']} | "
              f"{s['output_tokens']:,} | "
              f"{s['throughput_tok_s']:.1f} | {s['mean_batch_size']:.2f} | {s['tbt_p50_s']:.4f} | "
              f"{s['simulated_time_s']:.0f} | {s['total_wall_s']:.2f} |")  # fmt: skip
    print("\n### Online replay of the Azure conversation trace (gpu-only, qwen-72b; tiled past 19,366 rows)\n")
    print("| requests | completed | rejected | simulated (s) | wall (s) | wall / 10k requests (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    sizes = (2_000, 6_000, 20_000) if opts.quick else (10_000, 30_000, 100_000)
    for n in sizes:
        s = run_isolated("gpu-only", "qwen-72b", "azure-conv", n, None)
        print(f"| {n:,} | {s['requests_completed']:,} | {s['requests_rejected']:,} | {s['simulated_time_s']:.0f} | "
              f"{s['total_wall_s']:.2f} | {s['total_wall_s'] / n * 1e4:.2f} | {s['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
