"""Run several systems on one workload (in parallel processes) and compare them: table, JSON, CSV, plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from l3.parallel import process_map
from l3.report.plots import save_figure
from l3.report.summary import summarize
from l3.run import ParallelChoice, Stopwatch, simulate
from l3.sched.requests import Status
from l3.specs.model import get_model
from l3.specs.system import ParallelSpec, get_system
from l3.workload import load_workload

COLUMNS = {  # compare.csv / table column -> summary key
    "system": "system", "attention_model": "attention_model", "tp": "tp", "dp": "dp",
    "throughput_tok_s": "throughput_tok_s", "steady_throughput_tok_s": "steady_throughput_tok_s",
    "speedup": "speedup", "bound_tok_s": "bound_tok_s", "bound_fraction": "bound_fraction",
    "t50_output_s": "t50_output_s", "t90_output_s": "t90_output_s",
    "mean_batch_size": "mean_batch_size", "tbt_p50_s": "tbt_p50_s", "tbt_p99_s": "tbt_p99_s",
    "ttft_p50_s": "ttft_p50_s", "requests_completed": "requests_completed",
    "requests_rejected": "requests_rejected", "common_requests": "common_requests",
    "common_throughput_tok_s": "common_throughput_tok_s", "common_steady_throughput_tok_s":
    "common_steady_throughput_tok_s", "common_speedup": "common_speedup", "kv_capacity_bytes": "kv_capacity_bytes",
    "attention_peak_bw_bytes_per_s": "attention_peak_bw_bytes_per_s", "energy_j_per_token": "energy_j_per_token",
    "tokens_per_j": "tokens_per_j", "wall_time_s": "wall_time_s",
}  # fmt: skip
SPEEDUP_OF = "steady_throughput_tok_s"  # the measure speedups are taken of (docs/evaluation.md)


def run_one(args: tuple) -> tuple[dict, list[int]]:
    """One system's summary, and the ids of the requests it rejected."""
    system, model, workload, n, seed, mode, data_dir, parallel, subset = args
    wall = Stopwatch()
    with wall.part("load_workload"):
        wl = load_workload(workload, n_requests=n, seed=seed, mode=mode, data_dir=data_dir)
        if subset is not None:
            wl = wl.subset(np.asarray(subset), wl.name,
                           f"{wl.source}; the {len(subset)} requests every system served")  # fmt: skip
    res = simulate(get_system(system), get_model(model), wl, seed, parallel, wall=wall)
    return summarize(res, wall.parts), [int(i) for i in np.flatnonzero(res.table.status == Status.REJECTED)]


def _speedup(r: dict, base: dict, key: str, rejected: str) -> float | None:
    """r[key] / base[key], only where neither rejected a request (`rejected`: the count's key)."""
    if r[rejected] or base[rejected] or not base[key] or r[key] is None:
        return None
    return r[key] / base[key]


def compare(systems: list[str], model: str, workload: str, n: int | None, seed: int = 0, mode: str | None = None,
            data_dir: Path | None = None, jobs: int = 2, parallel: ParallelChoice = None,
            strict: bool = False) -> list[dict]:  # fmt: skip
    """One summary per system (same workload and seed), each with `speedup` (of steady-state throughput) over
    the baseline, gpu-only if it is among the systems, else the first. A system that rejected requests gets no
    speedup. When the systems served different request sets, every system is run again on the requests all of
    them served, at the TP x DP it ran at, and `common_*` give that run's figures. `strict`: a trace row the
    loader refuses is an error (checked here, before any system runs)."""
    for s in systems:  # fail early, in this process, on a bad name, spec or trace
        get_system(s)
    get_model(model)
    load_workload(workload, n_requests=n, seed=seed, mode=mode, data_dir=data_dir, strict=strict)

    def run_all(args: list[tuple]) -> list[tuple[dict, list[int]]]:
        with process_map(min(jobs, len(args))) as mapper:
            return mapper(run_one, args)

    out = run_all([(s, model, workload, n, seed, mode, data_dir, parallel, None) for s in systems])
    results = [r for r, _ in out]
    base = next((r for r in results if r["system"] == "gpu-only"), results[0])
    for r in results:
        r["speedup"] = _speedup(r, base, SPEEDUP_OF, "requests_rejected")
        r["speedup_baseline"] = base["system"]
        r["tokens_per_j"] = tokens_per_j(r)
    rejected = sorted(set().union(*(ids for _, ids in out)))
    total = results[0]["requests_total"]
    if rejected and len(rejected) < total:
        common = np.setdiff1d(np.arange(total), rejected)
        again = run_all([(s, model, workload, n, seed, mode, data_dir,
                          ParallelSpec(tp=r["deployment"]["tp"], dp=r["deployment"]["dp"]), common.tolist())
                         for s, r in zip(systems, results, strict=True)])  # fmt: skip
        for r, (c, _) in zip(results, again, strict=True):
            r |= {"common_requests": c["requests_completed"], "common_rejected": c["requests_rejected"],
                  "common_throughput_tok_s": c["throughput_tok_s"],
                  "common_steady_throughput_tok_s": c["steady_throughput_tok_s"]}  # fmt: skip
        for r in results:
            r["common_speedup"] = _speedup(r, base, "common_steady_throughput_tok_s", "common_rejected")
    for r in results:
        r["tp"], r["dp"] = r["deployment"]["tp"], r["deployment"]["dp"]
    return results


def compare_frame(results: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{col: r.get(key) for col, key in COLUMNS.items()} for r in results])


def tokens_per_j(summary: dict) -> float | None:
    """Output tokens per joule of a run (None where it made none)."""
    e = summary.get("energy_j_per_token")
    return 1.0 / e if e else None


def tbt_cdf(summary: dict) -> tuple[np.ndarray, np.ndarray]:
    """Token-gap CDF (seconds, fraction of tokens) from a summary's sparse histogram."""
    h = summary["tbt_histogram"]
    idx = np.array(sorted(int(i) for i in h["counts"]))
    if not len(idx):
        return np.empty(0), np.empty(0)
    counts = np.array([h["counts"][str(i)] for i in idx])
    values = 10 ** (h["log10_lo"] + (idx + 0.5) / h["bins_per_decade"])
    return values, np.cumsum(counts) / counts.sum()


def write_compare(results: list[dict], out: Path) -> None:
    """compare.json, compare.csv, and plots: throughput bars, batch size, TBT distribution."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    compare_frame(results).to_csv(out / "compare.csv", index=False)
    names = [r["system"] for r in results]
    r0 = results[0]
    title = f"{r0['model']} · {r0['workload']} ({r0['workload_mode']}, {r0['requests_total']} requests; simulated)"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = np.arange(len(results))
    axes[0].bar(x - 0.2, [0 if r["requests_rejected"] else r["throughput_tok_s"] for r in results], 0.4,
                label="total", color="tab:blue")  # fmt: skip
    axes[0].bar(x + 0.2, [0 if r["requests_rejected"] else r[SPEEDUP_OF] or 0 for r in results], 0.4,
                label="steady state", color="tab:cyan")  # fmt: skip
    for i, r in enumerate(results):
        if r["requests_rejected"]:
            axes[0].text(i, 0, f"OOM ({r['requests_rejected']} rejected)", rotation=90, ha="center", va="bottom",
                         fontsize=7)  # fmt: skip
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title("throughput (OOM: rejected requests)")
    axes[0].legend(fontsize=7)
    axes[1].bar(names, [r["mean_batch_size"] for r in results], color="tab:orange")
    axes[1].set_ylabel("requests per iteration (per replica)")
    axes[1].set_title("mean batch size")
    for r in results:
        x, y = tbt_cdf(r)
        axes[2].step(x, y, where="post", label=r["system"])
    axes[2].set_xscale("log")
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].set_xlabel("time between tokens (s)")
    axes[2].set_ylabel("fraction of tokens")
    axes[2].set_title("TBT distribution")
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, out / "compare.png")
