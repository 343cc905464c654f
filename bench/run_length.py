"""How each throughput measure moves with the length of an offline run (docs/evaluation.md).

For one model x workload, serves the first N requests of one seeded synthetic set (N = 200, 1,000, 5,000 by
default) on GPU-only and L3, both at the paper's TP/DP, and prints total throughput (output tokens / makespan),
steady-state throughput (10%-90% of the output), the times 50% and 90% of the output was out, and the bound.
Usage: python bench/run_length.py [--model qwen-72b] [--workload openr1] [--lengths 200,1000,5000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from l3.report.summary import summarize
from l3.run import deploy
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import get_system
from l3.workload import load_workload


def one(job: tuple[str, str, str, int]) -> dict:
    system, model, workload, n = job
    t0 = time.perf_counter()
    wl = load_workload(workload, n_requests=n, seed=0)
    s = summarize(Simulator(deploy(get_system(system), get_model(model), wl, 0, "paper"), wl).run())
    s["total_wall_s"] = time.perf_counter() - t0
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen-72b")
    ap.add_argument("--workload", default="openr1")
    ap.add_argument("--lengths", default="200,1000,5000")
    ap.add_argument("--systems", default="gpu-only,l3")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    systems = a.systems.split(",")
    jobs = [(s, a.model, a.workload, n) for n in lengths for s in systems]
    with mp.get_context("spawn").Pool(2) as pool:
        res = pool.map(one, sorted(jobs, key=lambda j: -j[3]), chunksize=1)  # longest first
    by = {(r["system"], r["requests_total"]): r for r in res}
    print(f"{a.model}, {a.workload} (offline, seed 0, the paper's TP/DP); simulated\n")
    print("| requests | system | total tok/s | steady tok/s | 50% out (s) | 90% out (s) | makespan (s) | bound tok/s "
          "| l3 / gpu-only: total | steady |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in lengths:
        for s in systems:
            r, g = by[(s, n)], by[(systems[0], n)]
            ratio = (f"{r['throughput_tok_s'] / g['throughput_tok_s']:.2f}x | "
                     f"{r['steady_throughput_tok_s'] / g['steady_throughput_tok_s']:.2f}x")
            print(f"| {n} | {s} | {r['throughput_tok_s']:.1f} | {r['steady_throughput_tok_s']:.1f} | "
                  f"{r['t50_output_s']:.0f} | {r['t90_output_s']:.0f} | {r['simulated_time_s']:.0f} | "
                  f"{r['bound_tok_s']:.1f} | {ratio if s != systems[0] else '- | -'} |")
    print(f"\nwall: {sum(r['total_wall_s'] for r in res):.0f} s of runs on 2 processes")


if __name__ == "__main__":
    main()
