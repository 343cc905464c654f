"""L3 end to end: the paper's models x workloads, the Mooncake trace online, and the ablations.

Prints markdown tables (simulated figures; wall time measured). Runs use both cores (one process each).
Usage: python bench/bench_l3.py [--requests N] [--only matrix|online|ablation]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from l3.report.study import ABLATIONS, ratio_cell
from l3.report.summary import summarize
from l3.run import deploy
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import get_system, with_overrides
from l3.workload import load_workload

MODELS = ("opt-66b", "qwen-72b", "gpt-175b")
WORKLOADS = ("openr1", "dolphin-r1", "openthoughts", "dolphin-short")


def one(job: tuple) -> dict:
    system, overrides, model, workload, n, mode = job
    spec = with_overrides(get_system(system), overrides) if overrides else get_system(system)
    t0 = time.perf_counter()
    wl = load_workload(workload, n_requests=n, seed=0, mode=mode)
    s = summarize(Simulator(deploy(spec, get_model(model), wl, 0, "paper"), wl).run())
    s["total_wall_s"] = time.perf_counter() - t0
    return s


def run_all(jobs: list[tuple]) -> list[dict]:
    with mp.get_context("spawn").Pool(2) as pool:
        return pool.map(one, jobs, chunksize=1)


def fmt_err(e: dict) -> str:
    return "-" if not e or e.get("median") is None else f"{e['median']:.1%} / {e['p90']:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--only", choices=("matrix", "online", "ablation"))
    opts = ap.parse_args()
    n = opts.requests
    if opts.only in (None, "matrix"):
        jobs = [(sysname, None, m, w, n, None) for m in MODELS for w in WORKLOADS for sysname in ("gpu-only", "l3")]
        res = run_all(jobs)
        print(f"\n### Offline, {n} requests per workload (seed 0), the paper's TP x DP\n")
        print("| model | workload | system | completed / rejected | throughput (tok/s) | steady (tok/s) "
              "| vs gpu-only: steady / total "
              "| mean batch "
              "| TBT p50 (s) | PIM pred. err. med / p90 | GPU pred. err. med / p90 | imbalance | wall (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i in range(0, len(res), 2):
            g, s = res[i], res[i + 1]
            for r in (g, s):
                print(f"| {r['model']} | {r['workload']} | {r['system']} | {r['requests_completed']} / "
                      f"{r['requests_rejected']} | {r['throughput_tok_s']:.1f} | {r['steady_throughput_tok_s']:.1f} | "
                      f"{ratio_cell(r, g)} | {r['mean_batch_size']:.1f}"
                      f" | {r['tbt_p50_s']:.3f} | {fmt_err(r.get('pim_predictor_error'))} | "
                      f"{fmt_err(r.get('gpu_predictor_error'))} | {r.get('rank_load_imbalance') or float('nan'):.2f} | "
                      f"{r['total_wall_s']:.1f} |")
    if opts.only in (None, "online"):
        jobs = [(sysname, None, m, "mooncake-conversation", n, None) for m in MODELS for sysname in ("gpu-only", "l3")]
        res = run_all(jobs)
        print(f"\n### Online: Mooncake conversation trace, first {n} requests at trace arrival times\n")
        print("| model | system | completed / rejected | throughput (tok/s) | TTFT p50 (s) | TBT p50 / p99 (s) "
              "| mean batch | wall (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in res:
            print(f"| {r['model']} | {r['system']} | {r['requests_completed']} / {r['requests_rejected']} | "
                  f"{r['throughput_tok_s']:.1f} | {r['ttft_p50_s'] or float('nan'):.2f} | {r['tbt_p50_s']:.3f} / "
                  f"{r['tbt_p99_s']:.3f} | {r['mean_batch_size']:.1f} | {r['total_wall_s']:.1f} |")
    if opts.only in (None, "ablation"):
        for model, workload in (("opt-66b", "openr1"), ("qwen-72b", "dolphin-r1")):
            jobs = [("l3", ov or None, model, workload, n, None) for ov in ABLATIONS.values()]
            res = run_all(jobs)
            base = res[0]
            print(f"\n### Ablation: {model}, {workload}, {n} requests\n")
            print("| variant | throughput (tok/s) | vs L3: steady / total | TBT p50 (s) | mean batch | GPU busy "
                  "| PIM busy "
                  "| GPU waited | PIM waited | chunks shortened | one-batch iterations |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for name, r in zip(ABLATIONS, res, strict=True):
                b = r["busy_fraction"]
                print(f"| {name} | {r['throughput_tok_s']:.1f} | {ratio_cell(r, base)}"
                      f" | {r['tbt_p50_s']:.3f} | {r['mean_batch_size']:.1f} | {b['gpu']:.0%} | {b['pim']:.0%} | "
                      f"{r['gpu_waited_fraction']:.0%} | {r['pim_waited_fraction']:.0%} | "
                      f"{r['prefill_chunks_shortened']} | {r['single_batch_iterations']} |")


if __name__ == "__main__":
    main()
