"""`l3 sweep report`: the best points per objective and Pareto fronts of throughput against capacity, cost and
energy, per model and workload (throughputs of different models are not compared)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from l3.errors import L3Error
from l3.report.plots import save_figure

Y = "summary.throughput_tok_s"
OBJECTIVES = {  # column -> (what it is, better)
    "summary.throughput_tok_s": ("throughput (tok/s)", "max"),
    "summary.steady_throughput_tok_s": ("steady-state throughput (tok/s)", "max"),
    "summary.energy_j_per_token": ("energy per token (J)", "min"),
    "summary.kv_capacity_bytes": ("KV capacity (bytes)", "max"),
}
FRONTS = {  # x column -> (axis label, better, file name)
    "summary.kv_capacity_bytes": ("KV capacity (GiB)", "max", "pareto-capacity.png", 2**30),
    "cost.dimms": ("DIMMs", "min", "pareto-dimms.png", 1),
    "cost.pim_area_mm2": ("PIM logic area, all chips and buffer chips (mm^2)", "min", "pareto-area.png", 1),
    "summary.energy_j_per_token": ("energy per output token (J)", "min", "pareto-energy.png", 1),
}


def pareto(x: np.ndarray, y: np.ndarray, x_better: str) -> np.ndarray:
    """Mask of the points no other point beats on both throughput y (higher) and x (`x_better`: max or min)."""
    sx = x if x_better == "max" else -x
    keep = np.ones(len(x), bool)
    for i in range(len(x)):
        keep[i] = not np.any((sx >= sx[i]) & (y >= y[i]) & ((sx > sx[i]) | (y > y[i])))
    return keep


def _params(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("param.") and df[c].nunique(dropna=False) > 1]


def _short(row: pd.Series, params: list[str]) -> str:
    return ", ".join(f"{c.rsplit('.', 1)[-1]}={row[c]}" for c in params) or row["label"]


def sweep_report(results: Path, out: Path) -> Path:
    """Write `out/report.md` and its Pareto plots from a sweep's Parquet file; returns the report's path."""
    if not results.exists():
        raise L3Error(f"{results}: no such file (l3 sweep SPEC.toml --out {results} writes it)")
    df = pd.read_parquet(results)
    if "status" not in df:
        raise L3Error(f"{results}: not a sweep's results (no status column)")
    ok, failed = df[df["status"] == "ok"].copy(), df[df["status"] != "ok"]
    out.mkdir(parents=True, exist_ok=True)
    params = _params(df)
    lines = [f"# Sweep report: `{results.name}`", "",
             f"{len(df)} points: {len(ok)} ran, {len(failed)} failed. Varied: "
             f"{', '.join(c.removeprefix('param.') for c in params) or 'nothing'}. Every figure is simulated; "
             "throughputs are compared only within one model and workload.", ""]  # fmt: skip
    groups = list(ok.groupby(["model", "workload"], sort=True)) if len(ok) else []
    for (model, workload), g in groups:
        lines += [f"## {model}, {workload}", "", "| objective | best | point |", "|---|---|---|"]
        for col, (what, better) in OBJECTIVES.items():
            vals = pd.to_numeric(g[col], errors="coerce") if col in g else pd.Series(dtype=float)
            if vals.notna().any():
                i = vals.idxmax() if better == "max" else vals.idxmin()
                lines.append(f"| {what}, {better} | {vals[i]:.4g} | {_short(g.loc[i], params)} |")
        lines.append("")
    for x, (xlabel, better, name, scale) in FRONTS.items():
        if x not in ok or not pd.to_numeric(ok[x], errors="coerce").gt(0).any() or not groups:
            continue
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
        lines += [f"## Throughput against {xlabel}", ""]
        for ax, ((model, workload), g) in zip(axes[0], groups, strict=True):
            xs = pd.to_numeric(g[x], errors="coerce").to_numpy(float) / scale
            ys = pd.to_numeric(g[Y], errors="coerce").to_numpy(float)
            valid = np.isfinite(xs) & np.isfinite(ys)
            front = np.zeros(len(g), bool)
            front[valid] = pareto(xs[valid], ys[valid], better)
            ax.scatter(xs[valid & ~front], ys[valid & ~front], color="lightgrey", s=18)
            order = np.argsort(xs[front])
            ax.plot(xs[front][order], ys[front][order], "o-", color="tab:blue")
            for (_, row), xv, yv in zip(g[front].iterrows(), xs[front], ys[front], strict=True):
                ax.annotate(_short(row, params), (xv, yv), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("throughput (tok/s)")
            ax.set_title(f"{model}, {workload}")
            lines += [f"- {model}, {workload}: front of {int(front.sum())} of {int(valid.sum())} points: "
                      + "; ".join(_short(r, params) for _, r in g[front].iterrows())]  # fmt: skip
        save_figure(fig, out / name)
        lines += ["", f"![{xlabel}]({name})", ""]
    if len(failed):
        lines += ["## Failed points", "", "| point | error |", "|---|---|"]
        lines += [f"| {r['label']} | {str(r['error']).replace('|', '/')} |" for _, r in failed.iterrows()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
