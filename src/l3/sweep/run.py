"""Running a sweep: every point is one simulation, run as a Ray task; finished points are appended to one Parquet
file as they finish, so an interrupted sweep resumes where it stopped.

Ray tasks rather than Ray Tune: a point is one deterministic function call with nothing to tune, schedule early
or checkpoint inside, so plain tasks with `ray.wait` give the progress and the streaming we need with the least
machinery; the same code runs on a local instance or on a cluster (`--address` or RAY_ADDRESS).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from l3.errors import L3Error
from l3.sweep.spec import Point, SweepSpec

INSTALL_HINT = "l3 sweep runs on Ray, an optional extra: pip install 'l3[sweep]' (ray and pyarrow)"


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b": scalar}; lists and other non-scalars become JSON text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        elif v is None or isinstance(v, (bool, int, float, str, np.integer, np.floating)):
            out[key] = v.item() if isinstance(v, (np.integer, np.floating)) else v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def cost_proxies(res) -> dict:
    """What the point's memory side adds, for Pareto fronts: DIMMs, and the PIM logic's silicon (mm^2)."""
    from l3.devices.pim.area import pim_area

    pim = res.deployment.system.pim
    if pim is None:
        return {"cost.dimms": 0, "cost.pim_area_mm2": 0.0}
    dram = pim.dram()
    a = pim_area(dram, pim.pu)
    return {"cost.dimms": dram.org.dimms,
            "cost.pim_area_mm2": dram.org.chips * a["chip_mm2"] + dram.org.ranks * a["rank_pu_mm2"],
            "cost.mac_lanes_per_bank": a["mac_lanes_per_bank"]}  # fmt: skip


def _point_columns(p: Point) -> dict:
    return {"point_id": p.point_id, "label": p.label, "model": p.model, "workload": p.workload,
            **{f"param.{k}": v for k, v in p.params}}  # fmt: skip


def evaluate(p: Point) -> dict:
    """Simulate one point. The row: the point's parameters, `status` (ok / failed) with the `error`, the
    simulation's wall time, cost proxies and every summary.json field (nested ones flattened with dots)."""
    from l3.report.summary import summarize
    from l3.run import parse_parallel, simulate
    from l3.specs.model import get_model
    from l3.specs.system import get_system, with_overrides
    from l3.workload import load_workload

    t0 = time.perf_counter()
    row = _point_columns(p)
    try:
        spec = get_system(p.base)
        if p.params:
            spec = with_overrides(spec, p.overrides(), name=f"{spec.name}[{p.label}]")
        wl = load_workload(p.workload, n_requests=p.requests, seed=p.seed)
        res = simulate(spec, get_model(p.model), wl, p.seed, parse_parallel(p.parallelism))
        row |= {"status": "ok", "error": None} | cost_proxies(res) | flatten(summarize(res), "summary.")
    except L3Error as exc:
        row |= {"status": "failed", "error": str(exc)}
    except Exception as exc:  # a defect, not a bad combination: recorded all the same, and the sweep goes on
        row |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    row["point_wall_s"] = time.perf_counter() - t0
    return row


class SweepStore:
    """The sweep's Parquet file: read on start, rewritten (to a temporary file, then renamed) after every point,
    so it always holds every finished point and nothing half-written. Columns are the union of the rows' fields in
    order of first appearance; a row without a field holds a null there."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        self.rows: list[dict] = pq.read_table(path).to_pylist() if path.exists() else []
        self._columns = dict.fromkeys(k for row in self.rows for k in row)

    def done(self) -> set[str]:
        return {r["point_id"] for r in self.rows}

    def add(self, row: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.rows.append(row)
        self._columns |= dict.fromkeys(row)
        table = pa.Table.from_pydict({k: [r.get(k) for r in self.rows] for k in self._columns})
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)


def import_ray():
    try:
        import ray
    except ImportError:
        raise L3Error(INSTALL_HINT) from None
    return ray


def run_sweep(spec: SweepSpec, out: Path, address: str | None = None, jobs: int | None = None,
              on_result: Callable[[dict], None] | None = None,
              on_start: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Run every point of `spec` not yet in `out` on Ray (a local instance of `jobs` CPUs, or the cluster at
    `address` / RAY_ADDRESS) and append each to `out` as it finishes (`on_result(row)` after each; `on_start`
    gets the counts first). Returns counts: points, skipped (already there), ok, failed."""
    return run_points(spec.points(), out, address, jobs, on_result, on_start)


def run_points(points: list[Point], out: Path, address: str | None = None, jobs: int | None = None,
               on_result: Callable[[dict], None] | None = None,
               on_start: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """`run_sweep` for a list of points."""
    out.parent.mkdir(parents=True, exist_ok=True)
    store = SweepStore(out)
    done = store.done()
    todo = [p for p in points if p.point_id not in done]
    counts = {"points": len(points), "skipped": len(points) - len(todo), "ok": 0, "failed": 0}
    if on_start is not None:
        on_start(counts)
    if not todo:
        return counts
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else jobs, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(evaluate)
        pending = {task.remote(p): p for p in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                p = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # the worker died: the point is recorded as failed
                    row = _point_columns(p) | {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                store.add(row)
                counts["ok" if row["status"] == "ok" else "failed"] += 1
                if on_result is not None:
                    on_result(row)
    finally:
        if started:
            ray.shutdown()
    return counts
