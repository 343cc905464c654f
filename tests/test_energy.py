"""Energy and area: hand-computed DRAM command energies, the surrogate against the engine, conservation, static
power over idle time, and energy that scales with the work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import make_workload
from l3.devices.pim.area import area_sweep, pim_area
from l3.devices.pim.commands import Cmd, Run
from l3.devices.pim.device import PimDevice
from l3.devices.pim.energy import COMPONENTS, PimEnergy, result_energy
from l3.devices.pim.kernels import KernelShape
from l3.devices.pim.report import pim_report
from l3.devices.pim.timing import RankEngine
from l3.report.summary import summarize
from l3.run import deploy
from l3.sched.timing import ENERGY_PARTS
from l3.sim.simulator import Simulator
from l3.specs.dram import DramSpec, get_org, get_timing
from l3.specs.model import get_model
from l3.specs.pim import PimFeatures, PimSpec
from l3.specs.system import ParallelSpec, get_system, with_overrides
from l3.workload import load_workload

DRAM = DramSpec(timing=get_timing("ddr4-3200"), org=get_org("ddr4-l3-2tb"))
CHIPS, TCK_NS = 8, 0.625  # chips per rank, ns per cycle
# DRAMsim3 DDR4_8Gb_x8_3200: VDD 1.2 V; mA: IDD0 57, IDD2N 37, IDD3N 52, IDD4R 168, IDD5B 250; tRC 74, tRAS 52, tRP 22,
# burst 4, tRFC 560 cycles. mA x V x ns = pJ.
ACT_PJ = 1.2 * (57 * 74 - 52 * 52 - 37 * 22) * TCK_NS
READ_PJ = 1.2 * (168 - 52) * 4 * TCK_NS
REF_PJ = 1.2 * (250 - 52) * 560 * TCK_NS
ACTIVE_MW = 1.2 * 52


def engine_energy(stream, refresh: bool = False) -> tuple[dict, object]:
    energy = PimEnergy(DRAM, PimSpec(), KernelShape.build(DRAM, PimSpec(), get_model("opt-66b")))
    res = RankEngine(DRAM, PimSpec(), refresh=refresh).run(stream)
    return result_energy(energy, res), res


def test_one_activation_and_one_burst_read_by_hand():
    e, res = engine_energy([Run(Cmd.ACT, bank=0, row=3), Run(Cmd.RD, bank=0), Run(Cmd.PRE, bank=0)])
    assert e["activate"] == pytest.approx(CHIPS * ACT_PJ * 1e-12)
    assert e["host_io"] == pytest.approx(CHIPS * READ_PJ * 1e-12)
    assert e["background"] == pytest.approx(res.cycles * TCK_NS * CHIPS * ACTIVE_MW * 1e-12)
    assert e["refresh"] == 0 and e["bank_read"] == 0 and e["bank_mac"] == 0


def test_one_refresh_by_hand():
    e, res = engine_energy([Run(Cmd.REF)])
    assert res.refreshes == 1
    assert e["refresh"] == pytest.approx(CHIPS * REF_PJ * 1e-12)
    assert e["activate"] == 0


def test_refreshes_during_a_long_run_are_charged_and_reopen_rows():
    stream = [Run(Cmd.ACT_AB, row=0), Run(Cmd.PIM_MAC, 50_000), Run(Cmd.PRE_AB)]
    on, res_on = engine_energy(stream, refresh=True)
    off, res_off = engine_energy(stream, refresh=False)
    assert res_on.refreshes > 1
    assert on["refresh"] == pytest.approx(res_on.refreshes * CHIPS * REF_PJ * 1e-12)
    # every refresh precharged the open rows, re-opened after it: one all-bank activation each
    assert res_on.counts["act"] - res_off.counts["act"] == 16 * res_on.refreshes
    assert on["bank_mac"] == pytest.approx(off["bank_mac"])


@pytest.mark.parametrize("model,n_hc,batch,context", [  # the two largest with the slow tests
    pytest.param("opt-66b", None, 64, 4096, marks=pytest.mark.slow), ("qwen-72b", None, 1, 65536),
    pytest.param("qwen-72b", 2, 130, 12000, marks=pytest.mark.slow), ("llama-3-8b", 1, 70, 17)])
def test_surrogate_energy_within_two_percent_of_engine(model, n_hc, batch, context):
    dev = PimDevice(DRAM, PimSpec(features=PimFeatures(n_hc=n_hc)), get_model(model))
    contexts = np.full(batch, context)
    rank = dev.layer_ranks(0, dev.default_channels(batch))
    _, _, fast = dev.layer_attention(contexts, rank)
    _, results = dev.engine_layer_attention_time(contexts, rank)
    for k, res in enumerate(results):
        if res is None:
            assert fast[k].sum() == 0
            continue
        exact = result_energy(dev.energy, res)
        assert fast[k].sum() == pytest.approx(sum(exact.values()), rel=0.02)
        for c in ("bank_read", "bank_mac", "rank_link"):  # what the kernel's commands do, exactly composed
            assert fast[k][COMPONENTS.index(c)] == pytest.approx(exact[c], rel=1e-6)


def test_surrogate_energy_on_mixed_contexts_and_without_inflight_relayout():
    for spec in (PimSpec(), PimSpec(features=PimFeatures(inflight_relayout=False))):
        dev = PimDevice(DRAM, spec, get_model("llama-3-8b"))
        rng = np.random.default_rng(3)
        contexts, rank = rng.integers(1, 6000, 10), rng.integers(0, 3, 10)
        fast = dev.layer_attention(contexts, rank)[2][:3].sum(axis=1)
        _, results = dev.engine_layer_attention_time(contexts, rank)
        exact = [sum(result_energy(dev.energy, r).values()) for r in results[:3]]
        np.testing.assert_allclose(fast, exact, rtol=0.02)


def test_pim_report_energy_covers_every_rank_and_sums():
    m = get_model("opt-66b")
    rep = pim_report(DRAM, PimSpec(), m, 4096, 64)
    assert sum(rep["energy_breakdown_j"].values()) == pytest.approx(rep["energy_j"])
    # every rank draws at least its precharged standby and refresh over the step
    dev = PimDevice(DRAM, PimSpec(), m)
    floor = dev.n_ranks * dev.energy.static_w * rep["step_attention_time_s"]
    assert rep["energy_j"] > floor
    # the device reads every KV byte once: at least one burst read's energy per byte of it
    kv = 64 * 4096 * m.kv_bytes_per_token
    assert rep["energy_breakdown_j"]["bank_read"] >= kv / 8 * READ_PJ * 1e-12 * 0.999


def test_idle_energy_is_linear_in_idle_time():
    energy = PimEnergy(DRAM, PimSpec(), KernelShape.build(DRAM, PimSpec(), get_model("opt-66b")))
    e = [energy.idle(s).sum() for s in (0.0, 1.0, 2.0, 5.0)]
    assert e[0] == 0 and e[2] == pytest.approx(2 * e[1]) and e[3] == pytest.approx(5 * e[1])
    assert e[1] == pytest.approx(energy.static_w)


def simulate(system: str, workload, model: str = "llama-2-7b", **overrides):
    spec = get_system(system)
    if overrides:
        spec = with_overrides(spec, overrides)
    dep = deploy(spec, get_model(model), workload, 0, ParallelSpec(tp=1, dp=8))
    return Simulator(dep, workload).run()


@pytest.mark.parametrize("system", ["gpu-only", "l3", "cpu-offload-mech", "hbm-pim"])
def test_run_energy_breakdown_sums_and_static_power_grows_with_idle_time(system):
    # CPU offloading keeps what fits in the GPUs' spare HBM there; here everything is offloaded
    tiers = {"coordination": {"asymmetric": False}} if system == "cpu-offload-mech" else {}
    res = simulate(system, load_workload("fixed:256:64", 16), **tiers)
    s = summarize(res)
    parts = s["energy_breakdown_j"]
    assert set(parts) == set(ENERGY_PARTS)
    assert sum(parts.values()) == pytest.approx(s["energy_j"])
    assert s["energy_j_per_token"] == pytest.approx(s["energy_j"] / s["output_tokens"])
    assert parts["gpu_compute"] > 0 and parts["gpu_memory"] > 0 and parts["gpu_idle"] > 0
    static = sum(res.system.static_power().values()) * res.system.replicas
    assert static > 0
    for extra in (10.0, 20.0):  # the same work over a longer makespan: only the static energy grows, linearly
        longer = summarize(dataclasses.replace(res, simulated_time_s=res.simulated_time_s + extra))
        assert longer["energy_j"] - s["energy_j"] == pytest.approx(static * extra)
    if system == "gpu-only":
        assert parts["dram_background"] == parts["dram_access"] == 0
    else:
        assert parts["dram_access"] > 0
    assert (parts["pcie"] > 0) == (system in ("l3", "cpu-offload-mech"))  # HBM-PIM: no host link crossed
    if system in ("l3", "cpu-offload-mech"):  # KV in DIMMs: their standby and refresh
        assert parts["dram_background"] > 0
    assert (parts["pim_compute"] > 0) == (system in ("l3", "hbm-pim"))
    assert (parts["cpu"] > 0) == (system == "cpu-offload-mech")


@pytest.mark.parametrize("system", ["gpu-only", pytest.param("l3", marks=pytest.mark.slow)])
def test_doubling_a_steady_workload_doubles_energy_not_energy_per_token(system):
    # eight replicas of at most 8 requests each: 64 requests are one wave on every replica, 128 two
    one, two = (summarize(simulate(system, load_workload("fixed:512:128", n), scheduler={"max_batch_size": 8}))
                for n in (64, 128))
    assert two["energy_j"] == pytest.approx(2 * one["energy_j"], rel=0.1)
    assert two["energy_j_per_token"] == pytest.approx(one["energy_j_per_token"], rel=0.1)


def test_more_requests_at_a_time_cost_less_energy_per_token_on_gpus():
    """Larger batches read the weights once for more tokens (the paper's energy argument for L3's batches)."""
    wl = load_workload("fixed:128:128", 64)
    small, large = (summarize(simulate("gpu-only", wl, scheduler={"max_batch_size": b})) for b in (4, 32))
    assert large["energy_j_per_token"] < small["energy_j_per_token"]
    assert large["energy_breakdown_j"]["gpu_memory"] < small["energy_breakdown_j"]["gpu_memory"]


def test_area_grows_with_mac_lanes_and_stays_a_fraction_of_the_die():
    spec = PimSpec()
    a = pim_area(DRAM, spec)
    assert a["chip_mm2"] == pytest.approx(16 * a["bank_pu_mm2"] + a["shared_buffer_mm2"])
    assert 0 < a["die_fraction"] < 1
    rows = area_sweep(DRAM, spec, reuse=(1, 2, 4, 8))
    lanes = [r["mac_lanes_per_bank"] for r in rows]
    assert lanes == [4, 8, 16, 32]  # 8-byte column access = 4 FP16 values x query heads served
    macs = [r["bank_pu_mac_mm2"] for r in rows]
    assert macs[1] == pytest.approx(2 * macs[0]) and macs[3] == pytest.approx(8 * macs[0])
    assert all(r["rank_pu_mm2"] == rows[0]["rank_pu_mm2"] for r in rows)


def test_workload_arrivals_keep_static_energy_honest():
    """A request arriving late leaves the machine idle in between: the run's energy includes that idle time."""
    early = make_workload([0.0, 0.0], [128, 128], [32, 32], mode="offline")
    late = make_workload([0.0, 50.0], [128, 128], [32, 32])
    a, b = (summarize(simulate("gpu-only", w)) for w in (early, late))
    assert b["simulated_time_s"] > a["simulated_time_s"] + 40
    assert b["energy_breakdown_j"]["gpu_idle"] > a["energy_breakdown_j"]["gpu_idle"]
    assert b["energy_j_per_token"] > a["energy_j_per_token"]
