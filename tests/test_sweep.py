"""Design-space sweeps: the spec's points, running on Ray (local and a two-node cluster), resuming, failures,
the report's Pareto fronts, and the message without Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from l3.errors import L3Error, SpecError
from l3.sweep.report import pareto, sweep_report
from l3.sweep.run import evaluate, import_ray, run_sweep
from l3.sweep.spec import SweepSpec

ray = pytest.importorskip("ray")

TINY = {"base": "gpu-only", "models": ["llama-2-7b"], "workloads": ["fixed:256:32"], "requests": 8,
        "parallelism": "1x8", "axes": {"gpu.preset": ["a100-80gb", "h100-sxm"],
                                       "scheduler.max_batch_size": [0, 2]}}  # fmt: skip
RESULT_COLUMNS = ["summary.throughput_tok_s", "summary.simulated_time_s", "summary.energy_j",
                  "summary.iterations", "summary.output_tokens"]  # fmt: skip


def spec(**changes) -> SweepSpec:
    return SweepSpec.build(TINY | changes)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module's sweeps (run_sweep uses it rather than starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_points_are_the_product_of_axes_models_and_workloads():
    s = spec(models=["llama-2-7b", "opt-66b"], axes=TINY["axes"] | {"coordination.policy": {"range": [1, 7, 2]}})
    pts = s.points()
    assert len(pts) == 2 * 1 * 2 * 2 * 3
    assert len({p.point_id for p in pts}) == len(pts)
    assert {v for p in pts for k, v in p.params if k == "coordination.policy"} == {1, 3, 5}
    p = pts[0]
    assert p.overrides() == {"coordination": {"policy": 1}, "gpu": {"preset": "a100-80gb"},
                             "scheduler": {"max_batch_size": 0}}  # fmt: skip
    assert [q.point_id for q in spec(models=["llama-2-7b", "opt-66b"], axes=s.axes).points()] == [
        q.point_id for q in pts]  # stable names: what a resumed sweep matches


def test_random_axes_come_from_the_seed():
    axes = {"pim.pu.rank_pu.clock_ghz": {"random": {"low": 0.5, "high": 2.0, "n": 5}},
            "pim.org_overrides.channels": {"random": {"low": 4, "high": 16, "n": 3, "integer": True, "log": True}}}
    a, b, c = spec(axes=axes).axis_values(), spec(axes=axes).axis_values(), spec(axes=axes, seed=1).axis_values()
    assert a == b and a != c
    clocks = a["pim.pu.rank_pu.clock_ghz"]
    assert len(clocks) == 5 and all(0.5 <= x <= 2.0 for x in clocks)
    assert all(isinstance(x, int) and 4 <= x <= 16 for x in a["pim.org_overrides.channels"])


@pytest.mark.parametrize("axes,expected", [({"": [1]}, "dotted path"), ({"a..b": [1]}, "dotted path"),
                                           ({"a.b": []}, "empty"), ({"a.b": {"between": [1, 2]}}, "range"),
                                           ({"a.b": {"range": [5, 1]}}, "empty"),
                                           ({"a.b": {"random": {"low": 1}}}, "random")])  # fmt: skip
def test_bad_axes_are_clear_errors(axes, expected):
    with pytest.raises(SpecError, match=expected):
        spec(axes=axes).points()


def test_without_ray_the_sweep_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(L3Error, match=r"pip install 'l3\[sweep\]'"):
        import_ray()


@pytest.mark.slow
def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path: Path, local_ray):
    s = spec(axes={"scheduler.block_size": [16, 0]})  # block_size 0 is not a valid system
    counts = run_sweep(s, tmp_path / "r.parquet", jobs=2)
    assert counts == {"points": 2, "skipped": 0, "ok": 1, "failed": 1}
    df = pd.read_parquet(tmp_path / "r.parquet")
    bad = df[df["status"] == "failed"].iloc[0]
    assert "block_size" in bad["error"] and bad["param.scheduler.block_size"] == 0
    assert df[df["status"] == "ok"]["summary.throughput_tok_s"].iloc[0] > 0


@pytest.mark.slow
def test_sweep_matches_direct_runs_and_resumes_without_recomputing(tmp_path: Path, local_ray):
    out, s = tmp_path / "r.parquet", spec()
    seen = []
    assert run_sweep(s, out, jobs=2, on_result=seen.append)["ok"] == 4
    df = pd.read_parquet(out).set_index("point_id")
    for p in s.points():  # every summary field the sweep stored is the direct simulation's
        direct = evaluate(p)
        for c in RESULT_COLUMNS:
            assert df.loc[p.point_id, c] == direct[c]
    # kill midway: keep two finished points; the restart runs only the other two
    pd.read_parquet(out).iloc[:2].to_parquet(out, index=False)
    kept = set(pd.read_parquet(out)["point_id"])
    rerun = []
    counts = run_sweep(s, out, jobs=2, on_result=rerun.append)
    assert counts == {"points": 4, "skipped": 2, "ok": 2, "failed": 0}
    assert not kept & {r["point_id"] for r in rerun}
    assert sorted(pd.read_parquet(out)["point_id"]) == sorted(p.point_id for p in s.points())


@pytest.mark.slow
def test_a_two_node_cluster_gives_the_same_results(tmp_path: Path):
    from ray.cluster_utils import Cluster

    s = spec()
    run_sweep(s, tmp_path / "local.parquet", jobs=2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_sweep(s, tmp_path / "cluster.parquet", address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    a, b = (pd.read_parquet(tmp_path / f).set_index("point_id").sort_index() for f in ("local.parquet",
                                                                                         "cluster.parquet"))
    pd.testing.assert_frame_equal(a[RESULT_COLUMNS], b[RESULT_COLUMNS])


def test_pareto_front_keeps_the_undominated():
    x = np.array([1.0, 2.0, 3.0, 2.0, 4.0])
    y = np.array([5.0, 4.0, 6.0, 7.0, 1.0])
    assert pareto(x, y, "max").tolist() == [False, False, True, True, True]  # more x and more y is better
    assert pareto(x, y, "min").tolist() == [True, False, False, True, False]  # less x, more y


def test_report_names_the_best_points_and_draws_fronts(tmp_path: Path):
    rows = [{"point_id": str(i), "label": f"p{i}", "model": "m", "workload": "w", "status": "ok", "error": None,
             "param.pim.org_overrides.channels": c, "summary.throughput_tok_s": t, "summary.energy_j_per_token": e,
             "summary.kv_capacity_bytes": c * 2**37, "cost.dimms": 2 * c, "cost.pim_area_mm2": 100.0 * c}
            for i, (c, t, e) in enumerate([(4, 100.0, 3.0), (8, 180.0, 2.0), (16, 200.0, 2.5)])]  # fmt: skip
    rows.append({"point_id": "x", "label": "bad", "model": "m", "workload": "w", "status": "failed",
                 "error": "pim.org_overrides.channels: must divide", "param.pim.org_overrides.channels": 3})
    pd.DataFrame(rows).to_parquet(tmp_path / "r.parquet", index=False)
    text = sweep_report(tmp_path / "r.parquet", tmp_path / "rep").read_text()
    assert "| throughput (tok/s), max | 200 | channels=16 |" in text
    assert "| energy per token (J), min | 2 | channels=8 |" in text
    assert "front of 2 of 3 points: channels=8; channels=16" in text  # against energy: 4 channels is dominated
    assert "must divide" in text
    for name in ("pareto-capacity.png", "pareto-dimms.png", "pareto-area.png", "pareto-energy.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
