"""Token-striped KV placement (l3-plus): throughput, imbalance and bound over chunk size, stripe domain, where
partials merge and whether the DP replicas share one DIMM pool (docs/l3-plus.md).

Serves one seeded synthetic set per model, every row at the paper's TP x DP (the same deployment for every row,
so rows differ only in placement) and `l3-plus` with its HBM tier off (striping alone), and prints total and
steady-state throughput, mean per-layer rank imbalance (slowest / mean working rank) and the share of idle ranks
beside it, the fraction of the physical bound reached, the two largest losses and the wall time of each
simulation.
- default: `l3`, and `l3-plus` with each (chunk_tokens, stripe_over, partial_merge);
- `--pools`: `gpu-only`, `l3`, and `l3-plus` with per-replica pools, a shared pool striped over the replica and a
  shared pool striped within the rankset (the paper uses 1,000 requests: `--pools --requests 1000`).
Usage: python bench/stripe_sweep.py [--pools] [--models qwen-72b,opt-66b] [--workload openr1] [--requests 200]
       [--chunks 512,1024,2048,4096,8192] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import time

from l3.report.summary import largest_losses, summarize
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import get_system, with_overrides
from l3.workload import load_workload


def one(job: tuple[str, str, str, int, dict]) -> dict:
    """Serve `workload` on `system` (with `l3-plus`, its HBM tier off and the `overrides` applied)."""
    system, model, workload, n, overrides = job
    spec = get_system(system)
    if system == "l3-plus":
        over = {"coordination": {"asymmetric": False}}
        for section, fields in overrides.items():
            over[section] = over.get(section, {}) | fields
        spec = with_overrides(spec, over, name="l3-plus[sweep]")
    t0 = time.perf_counter()
    wl = load_workload(workload, n_requests=n, seed=0)
    s = summarize(Simulator(spec.deploy(get_model(model), "paper"), wl).run())
    return s | {"job": job, "sim_wall_s": time.perf_counter() - t0}


def chunk_jobs(models: list[str], workload: str, n: int, chunks: list[int]) -> list[tuple]:
    coords = [{"chunk_tokens": c, "stripe_over": d, "partial_merge": m}
              for d, m, c in itertools.product(("rankset", "replica"), ("gpu", "host"), chunks)]  # fmt: skip
    return [(s, model, workload, n, {"coordination": c} if c else {})
            for model in models for s, c in [("l3", {})] + [("l3-plus", c) for c in coords]]  # fmt: skip


def pool_jobs(models: list[str], workload: str, n: int) -> list[tuple]:
    pools = [("replica", False), ("replica", True), ("rankset", True)]
    return [(s, model, workload, n, over) for model in models
            for s, over in [("gpu-only", {}), ("l3", {})] + [
                ("l3-plus", {"coordination": {"stripe_over": d}, "pim": {"shared": shared}}) for d, shared in pools]
            ]  # fmt: skip


def label(job: tuple, pools: bool) -> list[str]:
    system, _, _, _, over = job
    coord, pim = over.get("coordination", {}), over.get("pim", {})
    if system != "l3-plus":
        name = f"{system} (paper)" if system == "l3" else system
        return [name, "-", "-"] if pools else [name, "-", "-", "-"]
    if pools:
        return [system, coord["stripe_over"], "shared" if pim["shared"] else "per replica"]
    return ["striped", str(coord["chunk_tokens"]), coord["stripe_over"], coord["partial_merge"]]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def losses(s: dict) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {v:.2f}" for name, v in largest_losses(s["time_breakdown"], 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", action="store_true", help="compare pools and systems instead of chunk sizes")
    ap.add_argument("--models", default="qwen-72b,opt-66b")
    ap.add_argument("--workload", default="openr1")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--chunks", default="512,1024,2048,4096,8192")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    models = a.models.split(",")
    jobs = (pool_jobs(models, a.workload, a.requests) if a.pools
            else chunk_jobs(models, a.workload, a.requests, [int(x) for x in a.chunks.split(",")]))  # fmt: skip
    with mp.get_context("spawn").Pool(a.jobs) as pool:
        rows = pool.map(one, jobs, chunksize=1)
    print(f"{a.workload}, {a.requests} requests (seed 0), paper TP x DP, l3-plus without its HBM tier; simulated "
          "throughputs, measured wall")
    head = ["system", "stripe over", "pool"] if a.pools else ["placement", "chunk", "stripe over", "merge"]
    print("| model | " + " | ".join(head) + " | completed / rejected | tok/s | steady tok/s | imbalance | idle ranks "
          "| bound reached | largest losses | wall s |")
    print("|---|" + "---|" * len(head) + "---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['job'][1]} | {' | '.join(label(r['job'], a.pools))} | "
              f"{r['requests_completed']} / {r['requests_rejected']} | {r['throughput_tok_s']:,.1f} | "
              f"{fmt(r['steady_throughput_tok_s'], ',.1f')} | {fmt(r.get('rank_load_imbalance'), '.2f')} | "
              f"{fmt(r.get('idle_rank_fraction'), '.2f')} | {fmt(r['bound_fraction'], '.2f')} | {losses(r)} | "
              f"{r['sim_wall_s']:.1f} |")


if __name__ == "__main__":
    main()
