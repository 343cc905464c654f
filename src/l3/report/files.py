"""Write a run's outputs: summary.json, requests.csv, timeline.csv and PNG plots."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

from l3.errors import SpecError
from l3.report.plots import plot_over_time, plot_timeline
from l3.report.summary import requests_frame, summarize
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


def write_run(res: SimResult, out: Path) -> dict:
    """Write every output of one run into `out` (created); returns the summary dict."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(res)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    requests_frame(res).to_csv(out / "requests.csv", index=False)
    tl = pd.DataFrame(res.metrics.timeline, columns=["replica", "plan", "device", "start_s", "end_s", "label"])
    tl.to_csv(out / "timeline.csv", index=False)
    title = f"{summary['system']} · {summary['model']} · {summary['workload']} (simulated)"
    plot_over_time(res.metrics.series(), out / "batch_throughput.png", title)
    plot_timeline(res.metrics.timeline, out / "timeline.png", title)
    return summary
