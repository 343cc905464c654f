"""`l3 study`: the paper's experiments as named, reproducible runs, each writing a Markdown report and figures.

A study is a list of runs (system file + overrides, model, workload) executed in parallel processes; the
report states the command, what was simulated, and the tables the figures are drawn from.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from l3.errors import L3Error
from l3.report.summary import summarize
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import get_system, with_overrides
from l3.workload import load_workload

PAPER_MODELS = ("opt-66b", "qwen-72b", "gpt-175b")
PAPER_WORKLOADS = ("openr1", "dolphin-r1", "openthoughts", "dolphin-short")
PAPER_SYSTEMS = ("gpu-only", "hbm-pim", "hbm-pim-ext", "r-pim", "cpu-offload", "l3")
MECH_SYSTEMS = ("gpu-only", "hbm-pim-mech", "hbm-pim-ext-mech", "r-pim-mech", "cpu-offload-mech", "l3")
ABLATIONS = {
    "L3 (all on)": {},
    "rankset overlap off": {"coordination": {"rankset_overlap": False}},
    "sub-batch pipeline off": {"coordination": {"pipeline": False}},
    "scheduler: fill PIM capacity": {"coordination": {"policy": "fill-capacity"}},
    "scheduler: NeuPIMs halving": {"coordination": {"policy": "halving"}},
    "one-batch fallback off": {"coordination": {"single_batch_fallback": False}},
    "in-flight re-layout off": {"pim": {"pu": {"features": {"inflight_relayout": False}}}},
    "KV mapping off": {"pim": {"pu": {"features": {"kv_mapping": False}}}},
    "bubble-free fusion off": {"pim": {"pu": {"features": {"bubble_free": False}}}},
}


@dataclass(frozen=True)
class Run:
    label: str
    system: str
    model: str
    workload: str
    requests: int
    overrides: dict = field(default_factory=dict, hash=False, compare=False)


def execute(run: Run) -> dict:
    spec = get_system(run.system)
    if run.overrides:
        spec = with_overrides(spec, run.overrides, name=f"{run.system}[{run.label}]")
    wl = load_workload(run.workload, n_requests=run.requests, seed=0)
    s = summarize(Simulator(spec.deploy(get_model(run.model)), wl).run())
    s["label"] = run.label
    return s


def execute_all(runs: list[Run], jobs: int) -> list[dict]:
    for r in runs:  # fail early, in this process, on a bad spec
        spec = get_system(r.system)
        (with_overrides(spec, r.overrides) if r.overrides else spec).deploy(get_model(r.model))
    if jobs > 1:
        with mp.get_context("spawn").Pool(jobs) as pool:
            return pool.map(execute, runs, chunksize=1)
    return [execute(r) for r in runs]


def line_plot(path: Path, xs, series: dict[str, list[float]], xlabel: str, ylabel: str, log2x: bool = True,
              hline: tuple[str, float] | None = None) -> None:  # fmt: skip
    """One small line chart: a line per series over xs, optionally a dashed reference level."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[1], color="grey", ls="--", label=hline[0])
    if log2x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the studies ------------------------------------------------------------------------------------------
def main_study(n: int, systems: tuple[str, ...] = PAPER_SYSTEMS) -> tuple[list[Run], Callable]:
    runs = [Run(s, s, m, w, n) for m in PAPER_MODELS for w in PAPER_WORKLOADS for s in systems]

    def report(res: list[dict], out: Path) -> str:
        lines = []
        fig, axes = plt.subplots(1, len(PAPER_MODELS), figsize=(15, 4), sharey=True)
        for ax, m in zip(axes, PAPER_MODELS, strict=True):
            lines += [f"### {m}", "", "| workload | " + " | ".join(systems) + " |",
                      "|---|" + "---|" * len(systems)]  # fmt: skip
            for wi, w in enumerate(PAPER_WORKLOADS):
                row = {r["system"]: r for r in res if r["model"] == m and r["workload"] == w}
                base = row["gpu-only"]["throughput_tok_s"]
                cells = []
                for si, s in enumerate(systems):
                    r = row[s]
                    sp = r["throughput_tok_s"] / base if base else float("nan")
                    cells.append(f"{sp:.2f}x ({r['throughput_tok_s']:.0f} tok/s, {r['requests_rejected']} rej.)")
                    ax.bar(wi + (si - 2.5) * 0.13, sp, width=0.13, color=plt.get_cmap("tab10")(si),
                           label=s if wi == 0 else None)  # fmt: skip
                lines.append(f"| {w} | " + " | ".join(cells) + " |")
            lines.append("")
            ax.set_xticks(range(len(PAPER_WORKLOADS)), PAPER_WORKLOADS, rotation=20)
            ax.set_title(m)
            ax.axhline(1.0, color="grey", lw=0.8)
        axes[0].set_ylabel("throughput speedup over gpu-only")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "main.png", dpi=110)
        plt.close(fig)
        return "\n".join(["Speedup of output-token throughput over gpu-only (throughput, rejected requests).",
                          "", *lines, "![speedups](main.png)"])

    return runs, report


def ablation_study(n: int) -> tuple[list[Run], Callable]:
    cases = (("opt-66b", "openr1"), ("qwen-72b", "dolphin-r1"))
    runs = [Run(name, "l3", m, w, n, ov) for m, w in cases for name, ov in ABLATIONS.items()]

    def report(res: list[dict], out: Path) -> str:
        lines = []
        for m, w in cases:
            rows = [r for r in res if r["model"] == m and r["workload"] == w]
            base = rows[0]["throughput_tok_s"]
            lines += [f"### {m}, {w}", "", "| variant | tok/s | vs L3 | TBT p50 (s) | mean batch | rank imbalance |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            lines += [f"| {r['label']} | {r['throughput_tok_s']:.1f} | {r['throughput_tok_s'] / base:.2f}x | "
                      f"{r['tbt_p50_s']:.3f} | {r['mean_batch_size']:.1f} | {r['rank_load_imbalance']:.2f} |"
                      for r in rows]  # fmt: skip
            lines.append("")
        fig, ax = plt.subplots(figsize=(9, 4))
        for k, (m, w) in enumerate(cases):
            rows = [r for r in res if r["model"] == m and r["workload"] == w]
            ax.barh(np.arange(len(rows)) + 0.4 * k, [r["throughput_tok_s"] / rows[0]["throughput_tok_s"] for r in rows],
                    height=0.4, label=f"{m}, {w}")  # fmt: skip
        ax.set_yticks(np.arange(len(ABLATIONS)) + 0.2, list(ABLATIONS))
        ax.set_xlabel("throughput relative to L3 with everything on")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ablation.png", dpi=110)
        plt.close(fig)
        return "\n".join(["Each variant changes one switch of `l3.toml`; mechanisms in docs/l3-system.md.", "",
                          *lines, "![ablation](ablation.png)"])  # fmt: skip

    return runs, report


def capacity_study(n: int) -> tuple[list[Run], Callable]:
    """L3 with a fraction of the DIMMs (whole channels, so capacity and bandwidth shrink together)."""
    channels = (4, 8, 12, 16)  # multiples of OPT-66B's DP 4 (each replica owns whole channels)
    runs = [Run(f"{c} channels", "l3", "opt-66b", "openr1", n, {"pim": {"org_overrides": {"channels": c}}})
            for c in channels]  # fmt: skip
    runs.append(Run("gpu-only", "gpu-only", "opt-66b", "openr1", n))

    def report(res: list[dict], out: Path) -> str:
        base = res[-1]["throughput_tok_s"]
        lines = ["| DIMMs | capacity | tok/s | vs gpu-only | mean batch | rejected |", "|---|---|---|---|---|---|"]
        for c, r in zip(channels, res, strict=False):
            lines.append(f"| {2 * c} of 32 ({c / 16:.0%}) | {r['kv_capacity_bytes'] / 2**30:,.0f} GiB | "
                         f"{r['throughput_tok_s']:.1f} | {r['throughput_tok_s'] / base:.2f}x | "
                         f"{r['mean_batch_size']:.1f} | {r['requests_rejected']} |")  # fmt: skip
        line_plot(out / "capacity.png", [c / 16 for c in channels], {"l3": [r["throughput_tok_s"] for r in res[:-1]]},
                  "fraction of the DIMMs", "output tokens / s", log2x=False, hline=("gpu-only", base))
        return "\n".join(["OPT-66B on OpenR1-like requests, L3 with whole channels removed (DP 4 needs multiples of "
                          "4 channels, so the sweep starts at 25%).", "", *lines, "", "![capacity](capacity.png)"])

    return runs, report


def _org(dimms: int, ranks: int, rows: int) -> dict:
    return {"pim": {"org_overrides": {"dimms_per_channel": dimms, "ranks_per_dimm": ranks, "rows": rows}}}


def scaling_study(n: int) -> tuple[list[Run], Callable]:
    """From one rankset (16 channels x 1 rank, 512 GiB) up by 8x: capacity only (more rows), bandwidth only
    (more ranksets, fewer rows each), both (more ranksets)."""
    base_rows = 262144
    shapes = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (4, 2)}  # ranksets -> (DIMMs per channel, ranks per DIMM)
    runs = []
    for k, (d, r) in shapes.items():
        runs.append(Run(f"capacity x{k}", "l3", "opt-66b", "openr1", n, _org(1, 1, base_rows * k)))
        runs.append(Run(f"bandwidth x{k}", "l3", "opt-66b", "openr1", n, _org(d, r, base_rows // k)))
        runs.append(Run(f"both x{k}", "l3", "opt-66b", "openr1", n, _org(d, r, base_rows)))

    def report(res: list[dict], out: Path) -> str:
        by = {r["label"]: r for r in res}
        lines = ["| scale | capacity only: tok/s (batch) | bandwidth only: tok/s (batch) | both: tok/s (batch) |",
                 "|---|---|---|---|"]  # fmt: skip
        line_plot(out / "scaling.png", list(shapes),
                  {s: [by[f"{s} x{k}"]["throughput_tok_s"] for k in shapes] for s in ("capacity", "bandwidth", "both")},
                  "scale over one rankset (512 GiB, 3.3 TB/s)", "output tokens / s")  # fmt: skip
        for k in shapes:
            cells = [f"{by[f'{s} x{k}']['throughput_tok_s']:.1f} ({by[f'{s} x{k}']['mean_batch_size']:.1f})"
                     for s in ("capacity", "bandwidth", "both")]  # fmt: skip
            lines.append(f"| x{k} | " + " | ".join(cells) + " |")
        return "\n".join(["L3, OPT-66B, OpenR1-like requests. Capacity only: rows x k on one rankset; bandwidth only:"
                          " k ranksets with rows / k (capacity fixed at 512 GiB); both: k ranksets.", "", *lines,
                          "", "![scaling](scaling.png)"])  # fmt: skip

    return runs, report


def tbt_study(n: int) -> tuple[list[Run], Callable]:
    """Time between tokens of one decode step versus batch size and context, straight from each system's
    timing model (every request at the same context, placed evenly, two sub-batches where the system uses
    them, CPU offloading's HBM tier filled first); no workload is served."""
    from l3.sim.plan import Plan
    from l3.sim.requests import RequestTable
    from l3.systems import build_system

    batches, contexts = (1, 2, 4, 8, 16, 32, 64), (1024, 4096, 16384)

    def step_time(system, b: int, ctx: int) -> float | None:
        if b * ctx > system.kv_capacity_tokens:
            return None
        t = RequestTable(np.zeros(b), np.full(b, ctx - 1), np.full(b, 10**9))
        t.generated[:] = 1
        t.placement[:] = np.arange(b) % getattr(system, "slots", 1)
        sub = (np.arange(b) % 2).astype(np.int8)
        if len(system.kv_tiers) > 1:  # asymmetric: HBM first, as admission fills it; the tier is the sub-batch
            t.kv_tier[:] = sub = (np.arange(1, b + 1) * ctx > system.kv_tiers[0]).astype(np.int8)
        plan = Plan(decode_ids=np.arange(b), decode_sub=sub)
        return float(system.run(plan, t, 1).durations[0])

    def report(res: list[dict], out: Path) -> str:
        lines, fig_data = [], {}
        for name in PAPER_SYSTEMS:
            system = build_system(get_system(name).deploy(get_model("opt-66b")))
            grid = {(b, c): step_time(system, b, c) for b in batches for c in contexts}
            fig_data[name] = grid
        for c in contexts:
            lines += [f"### context {c // 1024}K tokens", "", "| batch | " + " | ".join(PAPER_SYSTEMS) + " |",
                      "|---|" + "---|" * len(PAPER_SYSTEMS)]  # fmt: skip
            for b in batches:
                cells = ["-" if fig_data[s][b, c] is None else f"{fig_data[s][b, c] * 1e3:.1f}" for s in PAPER_SYSTEMS]
                lines.append(f"| {b} | " + " | ".join(cells) + " |")
            lines.append("")
        fig, axes = plt.subplots(1, len(contexts), figsize=(14, 4), sharey=True)
        for ax, c in zip(axes, contexts, strict=True):
            for s in PAPER_SYSTEMS:
                pts = [(b, fig_data[s][b, c]) for b in batches if fig_data[s][b, c] is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=s)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"context {c // 1024}K")
            ax.set_xlabel("batch (requests per replica)")
        axes[0].set_ylabel("time between tokens (s)")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "tbt.png", dpi=110)
        plt.close(fig)
        return "\n".join(["OPT-66B, one replica's decode step in milliseconds ('-': the batch's KV does not fit the "
                          "system). Sub-batched systems are timed with two sub-batches (the scheduler may run small "
                          "batches as one; see docs/l3-system.md); CPU offloading fills its HBM tier first.", "",
                          *lines, "![tbt](tbt.png)"])  # fmt: skip

    return [], report


def long_context_study(n: int) -> tuple[list[Run], Callable]:
    """Real long-context traces online, and a context sweep to 128K tokens (fixed lengths)."""
    sweep = (8192, 32768, 65536, 131072)
    runs = [Run(f"{s} {w}", s, "qwen-72b", w, n) for w in ("mooncake-conversation", "azure-conv")
            for s in ("gpu-only", "l3")]  # fmt: skip
    runs += [Run(f"{s} {c // 1024}K", s, "opt-66b", f"fixed:{c - 512}:512", n) for c in sweep
             for s in ("gpu-only", "l3")]  # fmt: skip

    def report(res: list[dict], out: Path) -> str:
        lines = ["### Real traces (Qwen-72B, online at the traces' arrival times)", "",
                 "| run | completed / rejected | tok/s | TTFT p50 (s) | TBT p50 / p99 (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['requests_completed']} / {r['requests_rejected']} | {r['throughput_tok_s']:.1f}"
                  f" | {r['ttft_p50_s'] or float('nan'):.2f} | {r['tbt_p50_s']:.3f} / {r['tbt_p99_s']:.3f} |"
                  for r in res[:4]]  # fmt: skip
        lines += ["", "### Context sweep (OPT-66B, contexts of the given length = prompt + 512 output, offline)", "",
                  "| run | completed / rejected | tok/s | mean batch | TBT p50 (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['requests_completed']} / {r['requests_rejected']} | {r['throughput_tok_s']:.1f}"
                  f" | {r['mean_batch_size']:.1f} | {r['tbt_p50_s']:.3f} |" for r in res[4:]]  # fmt: skip
        line_plot(out / "long_context.png", [c // 1024 for c in sweep],
                  {s: [r["throughput_tok_s"] for r in res[4:] if r["system"] == s] for s in ("gpu-only", "l3")},
                  "context length (K tokens)", "output tokens / s")  # fmt: skip
        return "\n".join([*lines, "", "![context sweep](long_context.png)"])

    return runs, report


STUDIES: dict[str, Callable[[int], tuple[list[Run], Callable]]] = {
    "main": main_study,
    "main-mech": lambda n: main_study(n, MECH_SYSTEMS),
    "capacity": capacity_study,
    "scaling": scaling_study,
    "ablation": ablation_study,
    "tbt": tbt_study,
    "long-context": long_context_study,
}


def run_study(name: str, out: Path, requests: int, jobs: int) -> Path:
    """Run study `name` and write `out/report.md` with its figures; returns the report's path."""
    if name not in STUDIES:
        raise L3Error(f"unknown study {name!r}; expected one of: {', '.join(STUDIES)}")
    runs, report = STUDIES[name](requests)
    t0 = time.perf_counter()
    results = execute_all(runs, jobs)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    body = report(results, out)
    what = (f"{len(runs)} runs, {requests} requests each (seed 0), {wall:.0f} s wall on {jobs} processes"
            if runs else "computed from the systems' timing models (no workload served)")  # fmt: skip
    names = {r.system for r in runs} or set(PAPER_SYSTEMS)  # a study with no runs times the paper's systems
    ideal = sorted(n for n in names if (att := get_system(n).attention) is not None and att.variant == "ideal")
    models = (f"Idealised (decode attention at peak bandwidth): {', '.join(ideal)}; every other system is "
              "mechanism-level" if ideal else "Every system is mechanism-level")  # fmt: skip
    text = (f"# Study `{name}`\n\nCommand: `l3 study {name} --requests {requests}`; {what}. Every throughput and "
            f"latency is simulated. {models} (docs/evaluation.md).\n\n{body}\n")  # fmt: skip
    path = out / "report.md"
    path.write_text(text)
    import json

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return path
