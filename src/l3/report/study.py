"""`l3 study`: the paper's experiments as named, reproducible runs, each writing a Markdown report and figures.

A study is a list of runs (system file + overrides, model, workload) executed in parallel processes; the
report states the command, what was simulated, and the tables the figures are drawn from.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from l3.errors import L3Error
from l3.parallel import process_map
from l3.report.plots import save_figure
from l3.report.summary import largest_losses, summarize
from l3.run import deploy
from l3.sched.timing import ENERGY_PARTS
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import ParallelSpec, SystemSpec, get_system, with_overrides
from l3.workload import load_workload

PAPER_MODELS = ("opt-66b", "qwen-72b", "gpt-175b")
PAPER_WORKLOADS = ("openr1", "dolphin-r1", "openthoughts", "dolphin-short")
PAPER_SYSTEMS = ("gpu-only", "hbm-pim", "hbm-pim-ext", "r-pim", "cpu-offload", "l3", "l3-plus")
MECH_SYSTEMS = ("gpu-only", "hbm-pim-mech", "hbm-pim-ext-mech", "r-pim-mech", "cpu-offload-mech", "l3", "l3-plus")
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
# L3+'s extensions (docs/l3-plus.md), each taken away from (or, off by default, added to) `l3-plus`.
PAPER_ROW = "L3 (l3, the paper's design)"
PLUS_ABLATIONS = {
    "L3+ (l3-plus)": {},
    "striping off": {"coordination": {"placement": "rankset"}},
    "chunks rotate (no least-loaded choice)": {"coordination": {"chunk_order": "rotate"}},
    "HBM tier off": {"coordination": {"asymmetric": False}},
    "HBM tier off, shared pool on": {"coordination": {"asymmetric": False}, "pim": {"shared": True}},
    "rebalancing off": {"coordination": {"rebalance": False}},
}


@dataclass(frozen=True)
class Run:
    """One simulation of a study. `parallel`: "paper" (the paper's TP/DP), "auto" (probed), or None (the file's)."""

    label: str
    system: str
    model: str
    workload: str
    requests: int
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    parallel: str | None = "paper"

    def spec(self) -> SystemSpec:
        spec = get_system(self.system)
        return with_overrides(spec, self.overrides, name=f"{self.system}[{self.label}]") if self.overrides else spec


def choose(run: Run) -> dict:
    """The deployment a run gets: its TP/DP and how they were chosen (probes included)."""
    wl = load_workload(run.workload, n_requests=run.requests, seed=0)
    return deploy(run.spec(), get_model(run.model), wl, 0, run.parallel).selection


def execute(job: tuple[Run, dict]) -> dict:
    run, selection = job
    wl = load_workload(run.workload, n_requests=run.requests, seed=0)
    spec = run.spec()
    if "asymmetric" in selection:  # the probe chose the HBM tier's setting
        spec = with_overrides(spec, {"coordination": {"asymmetric": selection["asymmetric"]}})
    dep = spec.deploy(get_model(run.model), ParallelSpec(tp=selection["tp"], dp=selection["dp"]),
                      rule=selection["rule"])  # fmt: skip
    return summarize(Simulator(dep, wl).run())


@functools.cache
def _output_tokens(workload: str, requests: int) -> int:
    return int(load_workload(workload, n_requests=requests, seed=0).output_len.sum())


def _longest_first(runs: list[Run], idx) -> list[int]:
    """Run indices in the order the pool takes them: longest first, so that few workers idle at the end. A run's
    length goes with the tokens it generates; GPU-only runs take a second where the others take a minute, so they
    go last whatever their workload."""
    return sorted(idx, key=lambda i: (runs[i].spec().kind == "gpu-only",
                                      -_output_tokens(runs[i].workload, runs[i].requests), i))  # fmt: skip


def execute_all(runs: list[Run], jobs: int) -> list[dict]:
    """Every run's summary. TP/DP are chosen first (probing where a run asks for "auto"); runs that then come
    out identical (same system, overrides, model, workload and TP/DP) are simulated once and reported for each."""
    for r in runs:  # fail early, in this process, on a bad spec
        spec = r.spec()
        if r.parallel != "auto" and spec.parallelism_for(get_model(r.model))[0] != "auto":
            for variant in spec.tier_variants():
                variant.deploy(get_model(r.model), r.parallel)
    with process_map(jobs) as mapper:
        order = _longest_first(runs, range(len(runs)))
        selections = [None] * len(runs)
        for i, sel in zip(order, mapper(choose, [runs[i] for i in order]), strict=True):
            selections[i] = sel
        key = [(r.system, json.dumps(r.overrides, sort_keys=True), r.model, r.workload, r.requests, s["tp"], s["dp"],
                s.get("asymmetric")) for r, s in zip(runs, selections, strict=True)]  # fmt: skip
        first = {k: i for i, k in reversed(list(enumerate(key)))}
        unique = _longest_first(runs, set(first.values()))
        done = dict(zip(unique, mapper(execute, [(runs[i], selections[i]) for i in unique]),
                        strict=True))  # fmt: skip
    out = []
    for r, s, k in zip(runs, selections, key, strict=True):
        summary = dict(done[first[k]])
        summary["parallelism"] = {k2: v for k2, v in s.items() if k2 != "candidates"}
        summary["parallelism_candidates"] = s.get("candidates", [])
        summary["deployment"] = summary["deployment"] | {"parallelism_rule": s["rule"]}
        summary["label"] = r.label
        out.append(summary)
    return out


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
    save_figure(fig, path)


# --- the studies ------------------------------------------------------------------------------------------
LEAD = "steady_throughput_tok_s"  # the measure tables lead with (docs/evaluation.md: it moves less with N)
VIEWS = {"paper": "paper parallelism: the paper's TP x DP for every system",
         "best": "best parallelism: every system at the TP x DP its probe ranks best (parallelism = \"auto\")"}


def ratio_cell(r: dict, base: dict) -> str:
    """A system against a baseline: steady-state / total throughput ratios, only where both served every request
    (else OOM, or the system's own steady / total tok/s where only the baseline rejected requests)."""
    if r["requests_rejected"]:
        return f"OOM ({r['requests_rejected']} rejected)"
    steady = "-" if r[LEAD] is None else f"{r[LEAD]:.0f}"  # None: the run had no 10%-90% span
    if base["requests_rejected"] or not base[LEAD] or r[LEAD] is None:
        return f"{steady} / {r['throughput_tok_s']:.0f} tok/s"
    return f"{r[LEAD] / base[LEAD]:.2f}x / {r['throughput_tok_s'] / base['throughput_tok_s']:.2f}x"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main_study(n: int, systems: tuple[str, ...] = PAPER_SYSTEMS, name: str = "main") -> tuple[list[Run], Callable]:
    """The paper's matrix (models x workloads x `systems`) in both parallelism views; figures `{name}-{view}.png`."""
    runs = [Run(f"{s} [{v}]", s, m, w, n, parallel="auto" if v == "best" else "paper")
            for v in VIEWS for m in PAPER_MODELS for w in PAPER_WORKLOADS for s in systems]  # fmt: skip

    def view_table(res: list[dict], view: str, out: Path) -> list[str]:
        lines = [f"## {VIEWS[view]}", ""]
        fig, axes = plt.subplots(1, len(PAPER_MODELS), figsize=(15, 4), sharey=True)
        for ax, m in zip(axes, PAPER_MODELS, strict=True):
            labelled: set[str] = set()
            lines += [f"### {m}", "", "| workload | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
            for wi, w in enumerate(PAPER_WORKLOADS):
                row = {r["system"]: r for r in res if r["model"] == m and r["workload"] == w
                       and r["label"].endswith(f"[{view}]")}  # fmt: skip
                base = row["gpu-only"]
                cells = []
                for si, s in enumerate(systems):
                    r = row[s]
                    par = f", TP{r['deployment']['tp']}" if view == "best" else ""
                    cells.append(f"{ratio_cell(r, base)}{par}")
                    x = wi + (si - (len(systems) - 1) / 2) * 0.13
                    if r["requests_rejected"]:
                        ax.text(x, 0.02, "OOM", rotation=90, ha="center", va="bottom", fontsize=6)
                    elif not base["requests_rejected"]:
                        ax.bar(x, r[LEAD] / base[LEAD], width=0.13, color=plt.get_cmap("tab10")(si),
                               label=None if s in labelled else s)  # fmt: skip
                        labelled.add(s)
                lines.append(f"| {w} | " + " | ".join(cells) + " |")
            lines.append("")
            ax.set_xticks(range(len(PAPER_WORKLOADS)), PAPER_WORKLOADS, rotation=20)
            ax.set_title(f"{m} ({view} parallelism)")
            ax.axhline(1.0, color="grey", lw=0.8)
        axes[0].set_ylabel("steady-state throughput over gpu-only")
        axes[0].legend(fontsize=7)
        save_figure(fig, out / f"{name}-{view}.png")
        return [*lines, f"![{view} parallelism]({name}-{view}.png)", ""]

    def bound_table(res: list[dict]) -> list[str]:
        lines = ["## Every run against its bound (best parallelism)", "",
                 "total: output tokens / makespan (the paper's measure); steady: 10%-90% of the output; bound: the "
                 "hardware's throughput on the batches the run executed (docs/evaluation.md); reached: the share of "
                 "the bound achieved over the whole run, and within the steady-state window; time lost: the largest "
                 "causes, as shares of the replicas' time.", "",
                 "| model | workload | system | TP x DP | total tok/s | steady tok/s | bound tok/s | reached: run / "
                 "steady state | time lost to |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in res:
            if not r["label"].endswith("[best]"):
                continue
            lost = largest_losses(r["time_breakdown"], 3, 0.01)
            d = r["deployment"]
            lines.append(f"| {r['model']} | {r['workload']} | {r['system']} | {d['tp']} x {d['dp']} | "
                         f"{r['throughput_tok_s']:.0f} | {r[LEAD]:.0f} | {r['bound_tok_s']:.0f} | "
                         f"{r['bound_fraction']:.0%} / {_pct(r['steady_bound_fraction'])} | "
                         f"{', '.join(f'{k} {v:.0%}' for k, v in lost) or '-'} |")
        return [*lines, ""]

    def report(res: list[dict], out: Path) -> str:
        head = ["Throughput over gpu-only, in two views: steady-state (output tokens/s between the times 10% and 90% "
                "of the output was out) / total (output tokens / makespan, the paper's measure). A system that "
                "rejected requests shows OOM: its throughput covers fewer requests, so no ratio is taken. Where "
                "gpu-only itself is OOM, cells give the system's steady / total tok/s. TPn (best "
                "view): the tensor parallelism each system's probe chose (DP = 8 / TP).", ""]  # fmt: skip
        return "\n".join([*head, *view_table(res, "paper", out), *view_table(res, "best", out), *bound_table(res)])

    return runs, report


def ablation_study(n: int) -> tuple[list[Run], Callable]:
    cases = (("opt-66b", "openr1"), ("qwen-72b", "dolphin-r1"))
    plus_cases = (("qwen-72b", "openr1"), ("opt-66b", "openr1"))
    runs = [Run(name, "l3", m, w, n, ov) for m, w in cases for name, ov in ABLATIONS.items()]
    runs += [Run(PAPER_ROW, "l3", m, w, n) for m, w in plus_cases]
    runs += [Run(name, "l3-plus", m, w, n, ov) for m, w in plus_cases for name, ov in PLUS_ABLATIONS.items()]

    def table(rows: list[dict], base: dict, against: str, extra: bool) -> list[str]:
        head = (f"| variant | total tok/s | steady tok/s | vs {against}: steady / total | bound reached | TBT p50 (s) "
                "| mean batch | rank imbalance | transfer stall (s per rankset) |"
                + (" PIM busy | HBM-tier share |" if extra else ""))
        lines = [head, "|---" * (head.count("|") - 1) + "|"]
        for r in rows:
            line = (f"| {r['label']} | {r['throughput_tok_s']:.1f} | {r[LEAD]:.1f} | {ratio_cell(r, base)} | "
                    f"{r['bound_fraction']:.0%} | {r['tbt_p50_s']:.3f} | {r['mean_batch_size']:.1f} | "
                    f"{_ratio(r['rank_load_imbalance'])} | "
                    f"{np.mean([*r['transfer_stall_s'].values()]):.1f} |")  # fmt: skip
            if extra:
                line += f" {r['busy_fraction']['pim']:.0%} | {_pct(r['kv_tiers'].get('hbm_request_share'))} |"
            lines.append(line)
        return [*lines, ""]

    def report(res: list[dict], out: Path) -> str:
        lines = []
        for m, w in cases:
            rows = [r for r in res if r["model"] == m and r["workload"] == w and r["label"] in ABLATIONS]
            lines += [f"### {m}, {w}", "", *table(rows, rows[0], "L3", False)]
        plus = ["## L3+ extensions", "", "Each row takes one extension away from `l3-plus` (or adds the shared "
                "pool, off by default), at the paper's TP x DP; mechanisms and figures in docs/l3-plus.md. "
                "HBM-tier share: of the requests served, those whose KV stayed in the GPUs' HBM.", ""]  # fmt: skip
        for m, w in plus_cases:
            rows = [r for r in res if r["model"] == m and r["workload"] == w
                    and r["label"] in (PAPER_ROW, *PLUS_ABLATIONS)]  # fmt: skip
            plus += [f"### {m}, {w}", "", *table(rows, rows[1], "L3+", True)]
        fig, ax = plt.subplots(figsize=(9, 4))
        for k, (m, w) in enumerate(cases):
            rows = [r for r in res if r["model"] == m and r["workload"] == w and r["label"] in ABLATIONS]
            ax.barh(np.arange(len(rows)) + 0.4 * k, [r[LEAD] / rows[0][LEAD] for r in rows], height=0.4,
                    label=f"{m}, {w}")  # fmt: skip
        ax.set_yticks(np.arange(len(ABLATIONS)) + 0.2, list(ABLATIONS))
        ax.set_xlabel("steady-state throughput relative to L3 with everything on")
        ax.legend(fontsize=8)
        save_figure(fig, out / "ablation.png")
        return "\n".join(["Each variant changes one switch of `l3.toml` and runs at the paper's TP x DP; mechanisms in "
                          "docs/l3-system.md. Transfer stall: the seconds a rankset's ranks spent (mean over them, "
                          "summed over the run and the replicas) blocked by transfers into and out of the DIMMs, "
                          "every write of their channel when rankset overlap is off.", "",
                          *lines, "![ablation](ablation.png)", "", *plus])  # fmt: skip

    return runs, report


def capacity_study(n: int) -> tuple[list[Run], Callable]:
    """L3 with a fraction of the DIMMs (whole channels, so capacity and bandwidth shrink together)."""
    channels = (4, 8, 12, 16)  # multiples of OPT-66B's DP 4 (each replica owns whole channels)
    runs = [Run(f"{c} channels", "l3", "opt-66b", "openr1", n, {"pim": {"org_overrides": {"channels": c}}})
            for c in channels]  # fmt: skip
    runs.append(Run("gpu-only", "gpu-only", "opt-66b", "openr1", n, parallel="auto"))

    def report(res: list[dict], out: Path) -> str:
        base = res[-1]
        d = base["deployment"]
        lines = ["| DIMMs | capacity | total tok/s | steady tok/s | vs gpu-only: steady / total | mean batch "
                 "| rejected |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for c, r in zip(channels, res, strict=False):
            lines.append(f"| {2 * c} of 32 ({c / 16:.0%}) | {r['kv_capacity_bytes'] / 2**30:,.0f} GiB | "
                         f"{r['throughput_tok_s']:.1f} | {r[LEAD]:.1f} | {ratio_cell(r, base)} | "
                         f"{r['mean_batch_size']:.1f} | {r['requests_rejected']} |")  # fmt: skip
        line_plot(out / "capacity.png", [c / 16 for c in channels], {"l3": [r[LEAD] for r in res[:-1]]},
                  "fraction of the DIMMs", "steady-state output tokens / s", log2x=False,
                  hline=(f"gpu-only (TP{d['tp']} x DP{d['dp']})", base[LEAD]))  # fmt: skip
        return "\n".join(["OPT-66B on OpenR1-like requests, L3 (the paper's TP2 x DP4) with whole channels removed "
                          "(DP 4 needs multiples of 4 channels, so the sweep starts at 25%), against gpu-only at its "
                          f"best parallelism (TP{d['tp']} x DP{d['dp']}, {base['throughput_tok_s']:.1f} tok/s total, "
                          f"{base['requests_rejected']} rejected).", "", *lines, "", "![capacity](capacity.png)"])

    return runs, report


def _org(dimms: int, ranks: int, rows: int) -> dict:
    return {"pim": {"org_overrides": {"dimms_per_channel": dimms, "ranks_per_dimm": ranks, "rows": rows}}}


def scaling_study(n: int) -> tuple[list[Run], Callable]:
    """The paper's scaling study: GPT-175B on OpenR1, from one rankset (16 channels x 1 rank, 512 GiB) up by 8x:
    capacity only (more rows), bandwidth only (more ranksets, fewer rows each), both (more ranksets)."""
    base_rows = 262144
    shapes = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (4, 2)}  # ranksets -> (DIMMs per channel, ranks per DIMM)
    ways = ("capacity", "bandwidth", "both")
    runs = []
    for k, (d, r) in shapes.items():
        orgs = {"capacity": _org(1, 1, base_rows * k), "bandwidth": _org(d, r, base_rows // k),
                "both": _org(d, r, base_rows)}  # fmt: skip
        runs += [Run(f"{w} x{k}", "l3", "gpt-175b", "openr1", n, orgs[w]) for w in ways]

    def report(res: list[dict], out: Path) -> str:
        by = {r["label"]: r for r in res}
        lines = ["| scale | " + " | ".join(f"{w}: steady tok/s (total, batch)" for w in ways) + " |",
                 "|---|---|---|---|"]  # fmt: skip
        line_plot(out / "scaling.png", list(shapes),
                  {w: [by[f"{w} x{k}"][LEAD] for k in shapes] for w in ways},
                  "scale over one rankset (512 GiB, 3.3 TB/s)", "steady-state output tokens / s")  # fmt: skip
        for k in shapes:
            cells = []
            for w in ways:
                r = by[f"{w} x{k}"]
                cells.append(f"OOM ({r['requests_rejected']} rejected)" if r["requests_rejected"] else
                             f"{r[LEAD]:.1f} ({r['throughput_tok_s']:.1f}, {r['mean_batch_size']:.1f})")  # fmt: skip
            lines.append(f"| x{k} | " + " | ".join(cells) + " |")
        return "\n".join(["L3, GPT-175B (TP8 x DP1), OpenR1-like requests, as the paper ran it. Capacity only: "
                          "rows x k on one rankset; bandwidth only: k ranksets with rows / k (capacity fixed at "
                          "512 GiB); both: k ranksets.", "", *lines, "", "![scaling](scaling.png)"])  # fmt: skip

    return runs, report


def tbt_study(n: int) -> tuple[list[Run], Callable]:
    """Time between tokens of one decode step versus batch size and context, straight from each system's
    timing model (every request at the same context, placed evenly, two sub-batches where the system uses
    them, CPU offloading's HBM tier filled first); no workload is served."""
    from l3.sched.kv import DEVICE_TIER
    from l3.sched.plan import Plan
    from l3.sched.requests import RequestTable
    from l3.systems import build_system

    batches, contexts = (1, 2, 4, 8, 16, 32, 64), (1024, 4096, 16384)

    def step_time(system, b: int, ctx: int) -> float | None:
        if b * ctx > system.kv_capacity_tokens:
            return None
        t = RequestTable(np.zeros(b), np.full(b, ctx - 1), np.full(b, 10**9))
        t.generated[:] = 1
        t.placement[:] = np.arange(b) % getattr(system, "slots", 1)
        sub = (np.arange(b) % 2).astype(np.int8)
        on_device = np.full(b, system.topology().slots is not None)  # a memory-side device attends
        if len(system.kv_tiers) > 1:  # asymmetric: HBM first, as admission fills it; the tier is the sub-batch
            t.kv_tier[:] = sub = (np.arange(1, b + 1) * ctx > system.kv_tiers[0]).astype(np.int8)
            on_device = sub == DEVICE_TIER
        plan = Plan(decode_ids=np.arange(b), decode_sub=sub, decode_on_device=on_device)
        return float(system.run(plan, t, 1).durations[0])

    def report(res: list[dict], out: Path) -> str:
        lines, fig_data = [], {}
        for name in PAPER_SYSTEMS:
            # a file that leaves the HBM tier to a probe is timed with it (its first variant)
            system = build_system(get_system(name).tier_variants()[0].deploy(get_model("opt-66b"), "paper"))
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
        save_figure(fig, out / "tbt.png")
        return "\n".join(["OPT-66B at the paper's TP2 x DP4, one replica's decode step in milliseconds ('-': the "
                          "batch's KV does not fit the system). Sub-batched systems are timed with two sub-batches "
                          "(the scheduler may run small batches as one; see docs/l3-system.md); CPU offloading fills "
                          "its HBM tier first.", "",
                          *lines, "![tbt](tbt.png)"])  # fmt: skip

    return [], report


def long_context_study(n: int) -> tuple[list[Run], Callable]:
    """Real long-context traces online, and a context sweep to 128K tokens (fixed lengths); every system at its
    best parallelism."""
    sweep = (8192, 32768, 65536, 131072)
    systems = ("gpu-only", "l3", "l3-plus")
    runs = [Run(f"{s} {w}", s, "qwen-72b", w, n, parallel="auto") for w in ("mooncake-conversation", "azure-conv")
            for s in systems]  # fmt: skip
    traces = len(runs)
    runs += [Run(f"{s} {c // 1024}K", s, "opt-66b", f"fixed:{c - 512}:512", n, parallel="auto") for c in sweep
             for s in systems]  # fmt: skip

    def tput(r: dict, key: str) -> str:
        return f"OOM ({r['requests_rejected']} rejected)" if r["requests_rejected"] else f"{r[key]:.1f}"

    def par(r: dict) -> str:
        return f"{r['deployment']['tp']} x {r['deployment']['dp']}"

    def report(res: list[dict], out: Path) -> str:
        lines = ["### Real traces (Qwen-72B, online at the traces' arrival times)", "",
                 "| run | TP x DP | completed / rejected | tok/s | TTFT p50 (s) | TBT p50 / p99 (s) |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['label']} | {par(r)} | {r['requests_completed']} / {r['requests_rejected']} | "
                  f"{tput(r, 'throughput_tok_s')} | {r['ttft_p50_s'] or float('nan'):.2f} | {r['tbt_p50_s']:.3f} / "
                  f"{r['tbt_p99_s']:.3f} |" for r in res[:traces]]  # fmt: skip
        lines += ["", "### Context sweep (OPT-66B, contexts of the given length = prompt + 512 output, offline)", "",
                  "| run | TP x DP | completed / rejected | steady tok/s | total tok/s | mean batch | TBT p50 (s) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['label']} | {par(r)} | {r['requests_completed']} / {r['requests_rejected']} | "
                  f"{tput(r, LEAD)} | {tput(r, 'throughput_tok_s')} | {r['mean_batch_size']:.1f} | "
                  f"{r['tbt_p50_s']:.3f} |"
                  for r in res[traces:]]  # fmt: skip
        line_plot(out / "long_context.png", [c // 1024 for c in sweep],
                  {s: [np.nan if r["requests_rejected"] else r[LEAD] for r in res[traces:] if r["system"] == s]
                   for s in systems},
                  "context length (K tokens)", "steady-state output tokens / s (gaps: OOM)")  # fmt: skip
        return "\n".join(["Every system at its best parallelism (auto). OOM: the system rejected requests it can "
                          "never hold, so its throughput would cover fewer requests.", "", *lines, "",
                          "![context sweep](long_context.png)"])  # fmt: skip

    return runs, report


def energy_study(n: int) -> tuple[list[Run], Callable]:
    """Energy per output token of gpu-only and l3 over the paper's matrix, each at its best parallelism, with the
    breakdown by component (docs/energy.md)."""
    systems = ("gpu-only", "l3")
    runs = [Run(f"{s} {m} {w}", s, m, w, n, parallel="auto") for m in PAPER_MODELS for w in PAPER_WORKLOADS
            for s in systems]  # fmt: skip
    parts = list(ENERGY_PARTS)

    def cell(r: dict) -> str:
        if r["requests_rejected"]:
            return f"OOM ({r['requests_rejected']} rejected)"
        return f"{r['energy_j_per_token']:.3f}"

    def top(r: dict) -> str:
        b = r["energy_breakdown_j"]
        return ", ".join(f"{k} {v / r['energy_j']:.0%}" for k, v in sorted(b.items(), key=lambda kv: -kv[1])[:3])

    def report(res: list[dict], out: Path) -> str:
        by = {(r["system"], r["model"], r["workload"]): r for r in res}
        lines = ["| model | workload | gpu-only: TP x DP, J/token | l3: TP x DP, J/token | l3 / gpu-only | "
                 "gpu-only: largest parts | l3: largest parts |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        fig, axes = plt.subplots(1, len(PAPER_MODELS), figsize=(17, 4.5))
        colors = plt.get_cmap("tab10")
        for ax, m in zip(axes, PAPER_MODELS, strict=True):
            for wi, w in enumerate(PAPER_WORKLOADS):
                g, l3 = by["gpu-only", m, w], by["l3", m, w]
                both = not (g["requests_rejected"] or l3["requests_rejected"])
                ratio = f"{l3['energy_j_per_token'] / g['energy_j_per_token']:.2f}x" if both else "-"
                d = {k: f"{r['deployment']['tp']} x {r['deployment']['dp']}" for k, r in (("g", g), ("l", l3))}
                lines.append(f"| {m} | {w} | {d['g']}, {cell(g)} | {d['l']}, {cell(l3)} | {ratio} | {top(g)} | "
                             f"{top(l3)} |")  # fmt: skip
                for k, r in enumerate((g, l3)):  # gpu-only plain, l3 hatched
                    x = wi + (k - 0.5) * 0.4
                    if r["requests_rejected"]:
                        ax.text(x, 0.0, "OOM", rotation=90, ha="center", va="bottom", fontsize=7)
                        continue
                    bottom = 0.0
                    for pi, p in enumerate(parts):
                        v = r["energy_breakdown_j"][p] / r["output_tokens"]
                        ax.bar(x, v, 0.38, bottom=bottom, color=colors(pi), hatch="//" if k else None,
                               edgecolor="white", label=p if (m, wi, k) == (PAPER_MODELS[0], 0, 0) else None)
                        bottom += v
            ax.set_xticks(range(len(PAPER_WORKLOADS)), PAPER_WORKLOADS, fontsize=8)
            ax.set_title(f"{m}: gpu-only (left), l3 (right, hatched)")
        axes[0].set_ylabel("energy per output token (J)")
        fig.legend(loc="center right", fontsize=8)
        save_figure(fig, out / "energy.png", rect=(0, 0, 0.9, 1))
        return "\n".join(["Energy per output token: the run's energy (every device's dynamic energy, plus its static "
                          "power over the whole makespan) over its output tokens, by component (docs/energy.md). "
                          "Each system at its best parallelism (auto, the same rule for both); OOM: the system "
                          "rejected requests, so no ratio is taken.", "", *lines, "", "![energy](energy.png)"])

    return runs, report


PLATFORMS = (("DGX-A100 + DDR4-3200 DIMM-PIM (the paper's)", "gpu-only", "l3"),
             ("HGX H200 + DDR5-5600 DIMM-PIM", "gpu-only-h200", "l3-h200-ddr5"),
             ("HGX H200 + CXL DDR5-5600 PIM expanders", "gpu-only-h200", "l3-h200-cxl"))  # fmt: skip


def platforms_study(n: int) -> tuple[list[Run], Callable]:
    """L3 and its GPU-only baseline on the paper's platform and on a newer one, the three models on OpenR1, every
    run at its best parallelism."""
    runs = [Run(f"{s} {m}", s, m, "openr1", n, parallel="auto") for m in PAPER_MODELS for _, g, l3 in PLATFORMS
            for s in (g, l3)]  # fmt: skip

    def report(res: list[dict], out: Path) -> str:
        by = {(r["system"], r["model"]): r for r in res}
        lines = ["| model | platform | gpu-only: TP x DP, steady / total tok/s | L3: TP x DP, steady / total tok/s | "
                 "L3 over gpu-only: steady / total | J/token: gpu-only, L3 | L3 bound reached | L3 KV capacity |",
                 "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m in PAPER_MODELS:
            for name, g_sys, l_sys in PLATFORMS:
                g, l3 = by[g_sys, m], by[l_sys, m]

                def tput(r: dict) -> str:
                    d = r["deployment"]
                    if r["requests_rejected"]:
                        return f"{d['tp']} x {d['dp']}, OOM ({r['requests_rejected']} rejected)"
                    steady = "-" if r[LEAD] is None else f"{r[LEAD]:.0f}"
                    return f"{d['tp']} x {d['dp']}, {steady} / {r['throughput_tok_s']:.0f}"

                energy = ", ".join("-" if r["requests_rejected"] else f"{r['energy_j_per_token']:.2f}" for r in (g, l3))
                lines.append(f"| {m} | {name} | {tput(g)} | {tput(l3)} | {ratio_cell(l3, g)} | {energy} | "
                             f"{_pct(l3['bound_fraction'])} | {l3['kv_capacity_bytes'] / 2**40:.2f} TiB |")
        return "\n".join(["Each platform's L3 against the GPU-only machine it extends (same GPUs, links and host), "
                          "OpenR1, every run at its best parallelism (auto). OOM: the system rejected requests it "
                          "can never hold, so no ratio is taken.", "", *lines])

    return runs, report


STUDIES: dict[str, Callable[[int], tuple[list[Run], Callable]]] = {
    "main": main_study,
    "main-mech": lambda n: main_study(n, MECH_SYSTEMS, "main-mech"),
    "capacity": capacity_study,
    "scaling": scaling_study,
    "ablation": ablation_study,
    "tbt": tbt_study,
    "long-context": long_context_study,
    "energy": energy_study,
    "platforms": platforms_study,
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
    procs = f"{jobs} process{'es' if jobs > 1 else ''}"
    what = (f"{len(runs)} runs, {requests} requests each (seed 0), {wall:.0f} s wall on {procs}"
            if runs else "computed from the systems' timing models (no workload served)")  # fmt: skip
    names = {r.system for r in runs} or set(PAPER_SYSTEMS)  # a study with no runs times the paper's systems
    ideal = sorted(n for n in names if (att := get_system(n).attention) is not None and att.variant == "ideal")
    models = (f"Idealised (decode attention at peak bandwidth): {', '.join(ideal)}; every other system is "
              "mechanism-level" if ideal else "Every system is mechanism-level")  # fmt: skip
    text = (f"# Study `{name}`\n\nCommand: `l3 study {name} --requests {requests}`; {what}. Every throughput and "
            f"latency is simulated. {models} (docs/evaluation.md).\n\n{body}\n")  # fmt: skip
    path = out / "report.md"
    path.write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return path
