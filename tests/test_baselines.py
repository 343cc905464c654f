"""The paper's baselines: capacity accounting, link transfers and attention bounds of each mechanism."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import paper_or_dp8
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import get_system, with_overrides
from l3.systems import build_system
from l3.systems.gpu_only import GpuOnlySystem
from l3.workload import load_workload

BASELINES = ("hbm-pim", "hbm-pim-ext", "r-pim", "cpu-offload", "hbm-pim-mech", "hbm-pim-ext-mech",
             "cpu-offload-mech")
IDEAL = BASELINES[:4]


def system(name, model="opt-66b", **overrides):
    spec = get_system(name)
    if overrides:
        spec = with_overrides(spec, overrides)
    return build_system(spec.deploy(get_model(model), paper_or_dp8(model)))


def test_hbm_pim_kv_shares_hbm_with_the_weights():
    for model in ("opt-66b", "qwen-72b", "gpt-175b"):
        gpu_only = GpuOnlySystem(get_system("gpu-only").deploy(get_model(model), "paper"))
        assert system("hbm-pim", model).kv_capacity_tokens == gpu_only.kv_capacity_tokens


@pytest.mark.parametrize("name, total_bytes",
                         [("hbm-pim-ext", 320e9), ("r-pim", 2 * 2**40), ("cpu-offload", 2 * 2**40)])
def test_disaggregated_capacity_is_split_over_replicas(name, total_bytes):
    m = get_model("opt-66b")
    s = system(name)
    assert s.kv_tiers[-1] == int(total_bytes // s.dep.dp // m.kv_bytes_per_token)  # cpu-offload: + an HBM tier


def test_link_transfers_only_where_kv_lives_outside_the_gpus():
    assert system("hbm-pim").pcie(1e6) == 0.0
    for name in ("hbm-pim-ext", "r-pim", "cpu-offload", "l3"):
        s = system(name)
        link = s.dep.host_link
        assert s.pcie(1e6) == pytest.approx(link.latency_s + 1e6 / s.dep.tp / link.bw)
        assert s.pcie(16) > link.latency_s  # small transfers pay the latency, not bandwidth alone


@pytest.mark.parametrize("name", IDEAL)
def test_attention_is_bytes_over_bandwidth_when_idealised(name):
    s = system(name)
    m = s.dep.model
    ctx = np.array([1000.0, 5000.0, 123.0])
    work = s.pim_layer_work(np.arange(3), ctx, np.zeros(3, int), np.empty(0, int), np.empty(0), np.empty(0, int),
                            np.array([0, 10]))  # fmt: skip
    bytes0 = ctx.sum() * m.kv_bytes_per_token_layer
    bw = s.dep.system.attention.resolved("bandwidth") / s.dep.dp
    assert work[0, 0, 0] == pytest.approx(bytes0 / bw)
    assert work[1, 0, 0] == pytest.approx((ctx.sum() + 30) * m.kv_bytes_per_token_layer / bw)


def test_cpu_attention_bound_by_bandwidth_or_compute_as_shapes_dictate():
    ctx = np.full(4, 8192.0)
    args = (np.arange(4), ctx, np.zeros(4, int), np.empty(0, int), np.empty(0), np.empty(0, int), np.array([0]))
    mha = system("cpu-offload", "opt-66b")
    m = mha.dep.model
    dp = mha.dep.dp
    read = ctx.sum() * m.kv_bytes_per_token_layer / (16 * 25.6e9 / dp)  # 16 DDR4-3200 channels
    assert mha.pim_layer_work(*args)[0, 0, 0] == pytest.approx(read)  # MHA: 1 FLOP per KV byte, bandwidth-bound
    weak = system("cpu-offload", "opt-66b", attention={"flops": 50e9})  # a CPU that cannot keep up
    compute = ctx.sum() * 4 * m.head_dim * m.n_heads / (50e9 / dp)
    assert weak.pim_layer_work(*args)[0, 0, 0] == pytest.approx(compute)
    assert compute > read


def test_prefill_kv_writes_take_write_bandwidth():
    s = system("r-pim")
    m = s.dep.model
    work = s.pim_layer_work(np.empty(0, int), np.empty(0), np.empty(0, int), np.array([0]), np.array([2048.0]),
                            np.array([0]), np.array([0]))  # fmt: skip
    assert work[0, 0, 0] == pytest.approx(2048 * m.kv_bytes_per_token_layer / (409.6e9 / s.dep.dp))


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_serve_a_workload(name):
    wl = load_workload("dolphin-short", n_requests=40, seed=1)
    dep = get_system(name).deploy(get_model("llama-3-8b"), paper_or_dp8("llama-3-8b"))
    res = Simulator(dep, wl).run()
    assert np.all((res.table.status == 3) | (res.table.status == 4))
    assert res.simulated_time_s > 0


def test_mechanism_level_r_pim_is_bounded_by_the_rank_bus():
    """With no bank PUs every KV byte crosses the rank's 25.6 GB/s bus: no rank can beat that rate."""
    s = system("r-pim-mech", "llama-3-8b")
    m = s.dep.model
    ctx = np.array([4096.0, 9000.0, 30000.0])
    place = np.arange(3) % s.slots
    work = s.pim_layer_work(np.arange(3), ctx, place, np.empty(0, int), np.empty(0), np.empty(0, int), np.array([0]))
    share_bytes = np.bincount(place, weights=ctx, minlength=s.slots) * m.kv_bytes_per_token_layer / s.shard
    floor = share_bytes / 25.6e9
    per_slot = np.array([work[0, 0, s.ranks_of(np.array([k]), 0)[0]].max() for k in range(s.slots)])
    assert np.all(per_slot >= floor * (1 - 1e-9))
    assert s.kv_capacity_tokens == system("l3", "llama-3-8b").kv_capacity_tokens
    assert s.attention_bw * s.dep.dp == pytest.approx(64 * 25.6e9)  # peak: every rank's bus, not the bank PUs


def test_cpu_offload_derives_its_figures_from_the_cpu_spec():
    att = get_system("cpu-offload").attention
    assert att.resolved("bandwidth") == pytest.approx(16 * 8 * 3200e6)  # channels x 8 B x 3200 MT/s
    assert att.resolved("flops") == pytest.approx(2 * 64 * 2.25e9 * 32)  # cores x clock x FP32 FLOP/cycle
    assert att.resolved("capacity_bytes") == 2 * 2**40


def mech_work(s, ctx, offsets=(0,)):
    n = len(ctx)
    return s.pim_layer_work(np.arange(n), np.asarray(ctx, float), np.zeros(n, int), np.empty(0, int), np.empty(0),
                            np.empty(0, int), np.asarray(offsets))[:, 0, 0]  # fmt: skip


def test_mechanism_cpu_is_bandwidth_bound_for_mha_and_compute_bound_with_few_cores():
    s = system("cpu-offload-mech")
    m, dp = s.dep.model, s.dep.dp
    ctx = np.full(3, 6000.0)
    bytes_ = ctx.sum() * m.kv_bytes_per_token_layer
    refresh = 560 / 12480  # DDR4-3200 tRFC / tREFI
    assert mech_work(s, ctx)[0] == pytest.approx(bytes_ / (409.6e9 / dp * (1 - refresh)))
    few = dict(name="tiny", sockets=1, cores_per_socket=4, clock_ghz=2.0, fp32_flops_per_cycle=32,
               fp16_to_fp32_per_cycle=8, memory="ddr4-3200", channels=16, memory_bytes=2**40, tdp_w=100)  # fmt: skip
    weak = system("cpu-offload-mech", attention={"cpu": few})
    elements = ctx.sum() * m.kv_bytes_per_token_layer / 2
    cycles = elements * (1 / 8 + 2 * 1 / 32)  # widen + one FMA (2 FLOP) per element for MHA
    assert mech_work(weak, ctx)[0] == pytest.approx(cycles / (4 / dp * 2.0e9))
    assert mech_work(weak, ctx)[0] > bytes_ / (409.6e9 / dp)


def test_mechanism_hbm_pim_streams_at_tccd_l_with_row_switches_and_refresh():
    s = system("hbm-pim-mech", "llama-3-8b")
    h = s.dep.system.attention.hbm
    m = s.dep.model
    banks = h.banks / s.dep.dp
    ctx = np.array([1 << 20])  # long: every bank reads many whole rows
    per_bank = ctx[0] * m.kv_bytes_per_token_layer / 2 / banks
    accesses, rows = np.ceil(per_bank / 32), np.ceil(per_bank / 1024)
    expect = 2 * (accesses * 4 * 0.625e-9 + rows * 28e-9) / (1 - 350 / 3900)
    assert mech_work(s, ctx)[0] == pytest.approx(expect)
    ideal = system("hbm-pim", "llama-3-8b")
    many = np.array([100.0, 3000.0, 50000.0])
    assert np.all(mech_work(s, many) > mech_work(ideal, many))  # the idealisation is an upper bound
    short = mech_work(s, np.array([16.0]))[0]
    assert short >= 2 * (4 * 0.625e-9 + 28e-9)  # even a short context opens a row in every bank


def test_mechanism_hbm_pim_gqa_needs_mac_passes_beyond_the_pu_reuse():
    ctx = np.full(4, 20000.0)
    fast = mech_work(system("hbm-pim-mech", "qwen-72b"), ctx)[0]
    slow = mech_work(system("hbm-pim-mech", "qwen-72b", attention={"hbm": {"stacks": 40, "gqa_reuse_max": 1}}), ctx)[0]
    assert slow > 4 * fast  # 8 passes per access instead of 1; row switches are unchanged


@pytest.mark.parametrize("bad, field", [({"variant": "mechanism", "hbm": None, "cpu": None}, "variant"),
                                        ({"cpu": None, "bandwidth": None}, "bandwidth")])
def test_attention_spec_errors_name_the_field(bad, field):
    from l3.errors import SpecError

    with pytest.raises(SpecError, match=field):
        with_overrides(get_system("cpu-offload-mech"), {"attention": bad})
