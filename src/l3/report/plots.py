"""PNG plots for people: batch size and throughput over time, and a device timeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(timeline: list[tuple[int, str, float, float, str]], path: Path, title: str,
                  max_items: int = 60) -> None:  # fmt: skip
    """Gantt chart of the first recorded intervals: one lane per (replica, device)."""
    items = timeline[:max_items]
    lanes = sorted({(r, d) for r, d, *_ in items})
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * max(len(lanes), 1)))
    colors = plt.get_cmap("tab10")
    labels = sorted({lbl.split(" x")[0] for *_, lbl in items})
    for r, d, s, e, lbl in items:
        y = lanes.index((r, d))
        c = colors(labels.index(lbl.split(" x")[0]) % 10)
        ax.barh(y, e - s, left=s, height=0.6, color=c, edgecolor="black", lw=0.3)
    ax.set_yticks(range(len(lanes)), [f"replica {r} {d}" for r, d in lanes])
    ax.set_xlabel("simulated time (s)")
    ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i % 10)) for i in range(len(labels))]
    if labels:
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
