"""Run several systems on one workload (in parallel processes) and compare them: table, JSON, CSV, plots."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from l3.report.summary import summarize
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import get_system
from l3.workload import load_workload

COLUMNS = {  # compare.csv / table column -> summary key
    "system": "system", "attention_model": "attention_model", "throughput_tok_s": "throughput_tok_s",
    "speedup": "speedup",
    "mean_batch_size": "mean_batch_size", "tbt_p50_s": "tbt_p50_s", "tbt_p99_s": "tbt_p99_s",
    "ttft_p50_s": "ttft_p50_s", "requests_completed": "requests_completed",
    "requests_rejected": "requests_rejected", "kv_capacity_bytes": "kv_capacity_bytes",
    "attention_peak_bw_bytes_per_s": "attention_peak_bw_bytes_per_s", "wall_time_s": "wall_time_s",
}  # fmt: skip


def run_one(args: tuple[str, str, str, int | None, int, str | None, Path | None]) -> dict:
    system, model, workload, n, seed, mode, data_dir = args
    wl = load_workload(workload, n_requests=n, seed=seed, mode=mode, data_dir=data_dir)
    return summarize(Simulator(get_system(system).deploy(get_model(model)), wl).run())


def compare(systems: list[str], model: str, workload: str, n: int | None, seed: int = 0, mode: str | None = None,
            data_dir: Path | None = None, jobs: int = 2) -> list[dict]:  # fmt: skip
    """One summary per system (same workload and seed), each with `speedup` over the baseline: gpu-only if
    it is among the systems, else the first."""
    for s in systems:  # fail early, in this process, on a bad name
        get_system(s).deploy(get_model(model))
    args = [(s, model, workload, n, seed, mode, data_dir) for s in systems]
    if jobs > 1 and len(systems) > 1:
        with mp.get_context("spawn").Pool(min(jobs, len(systems))) as pool:
            results = pool.map(run_one, args, chunksize=1)
    else:
        results = [run_one(a) for a in args]
    base = next((r for r in results if r["system"] == "gpu-only"), results[0])
    for r in results:
        r["speedup"] = r["throughput_tok_s"] / base["throughput_tok_s"] if base["throughput_tok_s"] else None
        r["speedup_baseline"] = base["system"]
    return results


def compare_frame(results: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{col: r.get(key) for col, key in COLUMNS.items()} for r in results])


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
    axes[0].bar(names, [r["throughput_tok_s"] for r in results], color="tab:blue")
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title("throughput")
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
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
