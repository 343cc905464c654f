"""Write a run's outputs: summary.json, requests.csv, timeline.csv and PNG plots."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from l3.errors import SpecError
from l3.report.plots import plot_over_time, plot_timeline
from l3.report.summary import summarize
from l3.run import Stopwatch
from l3.sched.requests import Status
from l3.sim.simulator import SimResult


def prepare_out(out: Path) -> Path:
    """Create the output folder `out` and check that files can be written there, before any work starts; a
    SpecError (naming --out) otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out}: is a file; expected a folder (new or existing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise SpecError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return out


def requests_frame(res: SimResult) -> pd.DataFrame:
    """One row per request: lengths, status, times (seconds) and the reason of a rejection."""
    t = res.table
    ttft = t.first_token_s - t.arrival
    e2e = t.finish_s - t.arrival
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_tbt = np.where(t.output > 1, (t.finish_s - t.first_token_s) / (t.output - 1), np.nan)
    return pd.DataFrame({
        "id": np.arange(t.n), "arrival_s": t.arrival, "prompt_tokens": t.prompt, "output_tokens": t.output,
        "status": [Status(s).name.lower() for s in t.status], "replica": t.replica,
        "admitted_s": t.admitted_s, "first_token_s": t.first_token_s, "finish_s": t.finish_s, "ttft_s": ttft,
        "e2e_s": e2e, "mean_tbt_s": mean_tbt, "preemptions": t.preemptions,
        "reject_reason": [t.reject_reason.get(i, "") for i in range(t.n)],
    })  # fmt: skip


def write_run(res: SimResult, out: Path, wall: Stopwatch | None = None) -> dict:
    """Write every output of one run into `out` (created); returns the summary dict. The time spent writing is
    `wall`'s part "write_outputs" (the summary, written last, lists every part of `wall`)."""
    out.mkdir(parents=True, exist_ok=True)
    if wall is None:
        wall = Stopwatch()
        wall.parts["simulate"] = res.wall_time_s
    dep = res.deployment
    with wall.part("write_outputs"):
        requests_frame(res).to_csv(out / "requests.csv", index=False)
        tl = pd.DataFrame(res.metrics.timeline, columns=["replica", "plan", "device", "start_s", "end_s", "label"])
        tl.to_csv(out / "timeline.csv", index=False)
        title = f"{dep.system.name} · {dep.model.name} · {res.workload.name} (simulated)"
        series = res.metrics.series()
        plot_over_time(series, out / "batch_throughput.png", title)
        plot_timeline(res.metrics.timeline, series, out / "timeline.png", title,
                      res.metrics.output_times([0.25, 0.5, 0.75]))  # fmt: skip
    summary = summarize(res, wall.parts)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
