"""PNG plots for people: batch size and throughput over time, and a device timeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def save_figure(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay out `fig` (within `rect` of the figure, if given), write it to `path` as a PNG and free it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cumulative(series: np.ndarray, col: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Integral up to each edge of a quantity spread uniformly over each plan's [t0, t1]."""
    t0, t1 = series[:, 1], series[:, 2]
    span = np.maximum(t1 - t0, 1e-30)
    out = np.empty(len(edges))
    for i, e in enumerate(edges):  # edges are few (a plot's bins); the vector op runs over plans
        out[i] = float((col * np.clip((e - t0) / span, 0.0, 1.0)).sum())
    return out


def plot_over_time(series: np.ndarray, path: Path, title: str, bins: int = 200) -> None:
    """Two panels: running requests (summed over replicas) and output tokens/s, both per time bin."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    if len(series):
        end = float(series[:, 2].max())
        edges = np.linspace(0.0, end, bins + 1)
        width = np.diff(edges)
        batch_time = series[:, 4] * (series[:, 2] - series[:, 1])
        batch = np.diff(_cumulative(series, batch_time, edges)) / width
        tput = np.diff(_cumulative(series, series[:, 5], edges)) / width
        mid = (edges[:-1] + edges[1:]) / 2
        ax1.plot(mid, batch, lw=1.2)
        ax2.plot(mid, tput, lw=1.2, color="tab:green")
    ax1.set_ylabel("requests in batch\n(all replicas)")
    ax2.set_ylabel("output tokens / s")
    ax2.set_xlabel("simulated time (s)")
    ax1.set_title(title, fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def pick_iterations(timeline: list[tuple], series: np.ndarray, targets) -> list[int]:
    """The sampled plans (indices into `series`) that start nearest each target time (s), distinct and in
    time order; the first sampled ones when no target is finite (a run without output)."""
    plans = np.array(sorted({p for _, p, *_ in timeline}), dtype=int)
    targets = [t for t in np.atleast_1d(targets) if np.isfinite(t)]
    if not targets:
        return [int(p) for p in plans[:3]]
    chosen: list[int] = []
    for t in targets:
        left = [p for p in plans if p not in chosen]
        if left:
            chosen.append(int(min(left, key=lambda p: abs(series[p, 1] - t))))
    return sorted(chosen, key=lambda p: series[p, 1])


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, width) bars covering the union of (start, end) intervals."""
    a = np.array(sorted(spans), float)
    ends = np.maximum.accumulate(a[:, 1])
    first = np.r_[True, a[1:, 0] > ends[:-1]]  # an interval starting after every earlier one ended opens a bar
    starts, last = a[first, 0], np.r_[np.flatnonzero(first)[1:] - 1, len(a) - 1]
    return list(zip(starts.tolist(), (ends[last] - starts).tolist(), strict=True))


def plot_timeline(timeline: list[tuple[int, int, str, float, float, str]], series: np.ndarray, path: Path,
                  title: str, targets) -> None:  # fmt: skip
    """Gantt charts of sampled iterations, one panel each (the sampled iterations that start nearest the
    `targets` times, s), one lane per device, bars drawn per lane and kind as one collection. A rankset's lane
    shows when any of its ranks works (the union of their intervals: ranks of a rankset work concurrently, and
    thousands of overlapping bars would cost seconds to draw); sub-batch B is hatched."""
    plans = pick_iterations(timeline, series, targets)
    per_plan = [[(d, s, e, lbl) for _, p, d, s, e, lbl in timeline if p == q] for q in plans]
    order = {"gpu": 0, "pcie_up": 1, "pcie_down": 3}
    lanes = sorted({d.split("/")[0] for items in per_plan for d, *_ in items}, key=lambda d: (order.get(d, 2), d))
    kinds = sorted({lbl.split(" ", 1)[-1] for items in per_plan for *_, lbl in items})
    colors = plt.get_cmap("tab10")
    n = max(len(per_plan), 1)
    fig, axes = plt.subplots(n, 1, figsize=(11, 0.6 + n * (0.9 + 0.32 * max(len(lanes), 1))), squeeze=False)
    for ax, q, items in zip(axes[:, 0], plans or [None], per_plan or [[]], strict=True):
        groups: dict[tuple, list[tuple[float, float]]] = {}
        t0 = series[q, 1] if q is not None else 0.0
        for d, s, e, lbl in items:
            sub, kind = lbl.split(" ", 1) if " " in lbl else ("", lbl)
            key = (lanes.index(d.split("/")[0]), kind, sub == "B")
            groups.setdefault(key, []).append(((s - t0) * 1e3, (e - t0) * 1e3))
        for (lane, kind, hatched), spans in groups.items():
            ax.broken_barh(_union(spans), (lane - 0.3, 0.6), facecolors=colors(kinds.index(kind) % 10), linewidth=0,
                           hatch="///" if hatched else None)  # fmt: skip
        ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
        ax.set_ylim(len(lanes) - 0.5, -0.5)
        ax.set_ylabel("device", fontsize=8)
        ax.set_xlabel("ms since the iteration began (simulated)", fontsize=8)
        if q is not None:
            r, start, end, _, batch = series[q, :5]
            ax.set_title(f"replica {int(r)}, iteration starting at {start:.2f} s of the run: {int(batch)} requests, "
                         f"{(end - start) * 1e3:.1f} ms", fontsize=9)  # fmt: skip
    fig.suptitle(f"{title}: sampled iterations near 25/50/75% of the output (sub-batch B hatched)", fontsize=10)
    if kinds:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i % 10)) for i in range(len(kinds))]
        axes[0, 0].legend(handles, kinds, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)
