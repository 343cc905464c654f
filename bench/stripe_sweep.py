"""Token-striped KV placement (l3-plus): throughput, imbalance and bound over chunk size, stripe domain and
where partials merge (docs/l3-plus.md).

Serves one seeded synthetic set per model on `l3` and on `l3-plus` with each (chunk_tokens, stripe_over,
partial_merge), all at the paper's TP x DP (the same deployment for every row, so rows differ only in
placement), and prints total and steady-state throughput, mean per-layer rank imbalance (slowest / mean working
rank) and the share of idle ranks beside it, the fraction of the physical bound reached and the wall time of each
simulation.
Usage: python bench/stripe_sweep.py [--models qwen-72b,opt-66b] [--workload openr1] [--requests 200]
       [--chunks 512,1024,2048,4096,8192] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import time

from l3.report.summary import summarize
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import get_system, with_overrides
from l3.workload import load_workload


def one(job: tuple[str, str, int, dict]) -> dict:
    model, workload, n, coord = job
    spec = get_system("l3-plus" if coord else "l3")
    if coord:  # striping alone: the HBM tier off, as when the sweep chose the striping defaults
        spec = with_overrides(spec, {"coordination": coord | {"asymmetric": False}}, name="l3-plus[sweep]")
    t0 = time.perf_counter()
    wl = load_workload(workload, n_requests=n, seed=0)
    s = summarize(Simulator(spec.deploy(get_model(model), "paper"), wl).run())
    return s | {"coord": coord, "model_name": model, "sim_wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen-72b,opt-66b")
    ap.add_argument("--workload", default="openr1")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--chunks", default="512,1024,2048,4096,8192")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    coords = [{}] + [{"chunk_tokens": c, "stripe_over": d, "partial_merge": m}
                     for d, m, c in itertools.product(("rankset", "replica"), ("gpu", "host"),
                                                      [int(x) for x in a.chunks.split(",")])]  # fmt: skip
    jobs = [(model, a.workload, a.requests, c) for model in a.models.split(",") for c in coords]
    with mp.get_context("spawn").Pool(a.jobs) as pool:
        rows = pool.map(one, jobs, chunksize=1)
    print(f"{a.workload}, {a.requests} requests (seed 0), paper TP x DP; simulated throughputs, measured wall")
    print("| model | placement | chunk | stripe over | merge | tok/s | steady tok/s | imbalance | idle ranks "
          "| bound reached | wall s |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["coord"]
        paper = ("l3 (paper)", "-", "-", "-")
        where = ("striped", c["chunk_tokens"], c["stripe_over"], c["partial_merge"]) if c else paper
        print(f"| {r['model_name']} | {' | '.join(map(str, where))} | {r['throughput_tok_s']:.0f} | "
              f"{r['steady_throughput_tok_s'] or 0:.0f} | {r.get('rank_load_imbalance') or 0:.2f} | "
              f"{r.get('idle_rank_fraction') or 0:.2f} | {r['bound_fraction']:.2f} | {r['sim_wall_s']:.1f} |")


if __name__ == "__main__":
    main()
