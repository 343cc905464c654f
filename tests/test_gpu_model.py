"""GPU cost model: roofline mechanisms and agreement with measured H100 kernel times."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from l3.devices.gpu import GpuCostModel, GpuModelParams
from l3.devices.gpu_profiles import (
    ALLREDUCE_REL,
    GEMMS,
    MEMORY_OPS,
    PROFILE_MODELS,
    derived_params,
    error_table,
    find_profiles,
    profile_points,
)
from l3.specs.hardware import get_gpu, get_link
from l3.specs.model import get_model

HBM = 3.35e12  # H100-SXM peak HBM bandwidth, bytes/s


def model(name="llama-2-7b", tp=1, **params):
    return GpuCostModel(
        get_model(name), get_gpu("h100-sxm"), tp, get_link("nvlink4"), GpuModelParams(**params)
    )


NO_LATENCY = dict(gemm_overhead_s=0.0, tile_latency_s=0.0)


def test_large_gemm_is_compute_bound_at_the_cap():
    g = model(**NO_LATENCY)
    m, n, k = 10 * 128, 132 * 256, 4096  # exactly 10 waves of 128x256 tiles on 132 SMs
    ideal = 2 * m * n * k / (989.4e12 * 0.8)
    assert g.gemm(m, n, k) == pytest.approx(ideal, rel=0.01)  # tile-aligned: no quantisation loss


def test_skinny_gemm_is_memory_bound():
    g = model(**NO_LATENCY)
    n = k = 8192  # one token: reading the weight dominates; split-K would only add partials
    assert g.gemm(1, n, k) == pytest.approx((n * k + n + k) * 2 / (3.35e12 * 0.85), rel=1e-6)


def test_wave_quantisation_makes_time_a_step_function():
    g = model(min_split_k=1 << 30)  # no split-K: time is monotone in tokens
    m = np.arange(1, 4097)
    t = g.gemm(m, 12288, 4096)
    assert np.all(np.diff(t) >= -1e-15)  # never faster with more tokens
    assert g.gemm(129 * 8, 12288, 4096) > g.gemm(128 * 8, 12288, 4096)  # past a tile row: another wave


def test_split_k_fills_idle_sms_for_small_gemms():
    few_tiles = dict(m=16, n=1024, k=8192)  # 16 output tiles of the smallest shape for 132 SMs
    assert model().gemm(**few_tiles) < 0.7 * model(min_split_k=1 << 30).gemm(**few_tiles)


def test_gemm_takes_the_fastest_tile_shape():
    """Item 9: each GEMM runs the fastest (tile shape, split-K) candidate, not one fixed 128x256 tile."""
    shapes = GpuModelParams().gemm_tiles
    m = np.arange(1, 2049)
    for n, k in ((8192, 8192), (1280, 8192), (28672, 4096)):
        each = np.array([model(gemm_tiles=(s,)).gemm(m, n, k) for s in shapes])
        np.testing.assert_allclose(model().gemm(m, n, k), each.min(axis=0), rtol=1e-12)
    # 136 tokens of an 8192-wide output: 2 x 32 = 64 tiles of 128x256 on 132 SMs; smaller tiles fill them
    assert model().gemm(136, 8192, 8192) < 0.95 * model(gemm_tiles=((128, 256),)).gemm(136, 8192, 8192)


def test_memory_kernels_have_a_latency_floor_and_their_own_bandwidth():
    """Item 7: a memory-bound kernel takes its class's one-token latency, or its bytes at the class's bandwidth."""
    g, p, d = model(), GpuModelParams(), 4096
    ops = g.op_times(np.array([1, 4096]))
    assert ops["input_layernorm"][0] == p.norm.latency_s
    assert ops["input_layernorm"][1] == pytest.approx(2 * 4096 * d * 2 / (p.norm.bw_fraction * HBM))
    assert ops["add"][1] == pytest.approx(3 * 4096 * d * 2 / (p.add.bw_fraction * HBM))
    assert ops["mlp_act"][1] == pytest.approx(3 * 4096 * 11008 * 2 / (p.act.bw_fraction * HBM))
    assert ops["emb"][1] == pytest.approx(2 * 4096 * d * 2 / (p.emb.bw_fraction * HBM))
    assert ops["attn_rope"][0] == p.rope.latency_s


def test_memory_kernels_fitting_in_l2_run_at_their_in_l2_rate():
    """A norm whose bytes fit in the L2 cache (its input just written there) runs at the class's in-L2 rate, one
    token more past the cache at the HBM rate; a class without an in-L2 rate (rope) keeps one rate either side."""
    g, p, d = model(), GpuModelParams(), 4096
    l2 = get_gpu("h100-sxm").l2_bytes
    fit = l2 // (2 * d * 2)  # tokens whose norm (read + write of the hidden state) just fits
    norm = g.op_times(np.array([fit, fit + 1]))["input_layernorm"]
    assert norm[0] == pytest.approx(2 * fit * d * 2 / (p.norm.l2_bw_fraction * HBM))
    assert norm[1] == pytest.approx(2 * (fit + 1) * d * 2 / (p.norm.bw_fraction * HBM))
    assert norm[1] > norm[0] * (p.norm.l2_bw_fraction / p.norm.bw_fraction) * 0.99
    assert p.rope.l2_bw_fraction is None
    rope_bytes = g.memory_op_bytes(np.array([fit, 4 * fit]))["attn_rope"]
    rope = g.op_times(np.array([fit, 4 * fit]))["attn_rope"]
    assert rope == pytest.approx(rope_bytes / (p.rope.bw_fraction * HBM))


def test_embedding_is_charged_once_per_iteration():
    """Item 7: the iteration's non-layer work includes the embedding of all its tokens (and its TP all-reduce)."""
    for tp in (1, 2):
        g = model(tp=tp)
        extra = g.embed_and_head(512, 4) - g.embed_and_head(0, 4)
        assert extra == pytest.approx(g.embedding(512)) and extra > 0
        assert g.embedding(512) == pytest.approx(g.op_times(512)["emb"] + g.allreduce(512 * 4096 * 2))
    assert model().embedding(0) == 0


def test_rotary_embedding_is_charged_only_to_rope_models(tmp_path: Path):
    """Item 8: OPT and GPT-3 have learned absolute positions, no rotary embedding in their layers."""
    assert {n: get_model(n).positional for n in ("opt-66b", "gpt-175b", "llama-2-7b", "qwen-72b")} == {
        "opt-66b": "learned", "gpt-175b": "learned", "llama-2-7b": "rope", "qwen-72b": "rope"}  # fmt: skip
    opt = model("opt-66b", tp=2)
    assert "attn_rope" not in opt.op_times(64) and "attn_rope" in model().op_times(64)
    ops, layer = opt.op_times(64), opt.layer(64, 0, 0.0, 0.0, 0.0)
    assert layer.pre_attn == pytest.approx(ops["input_layernorm"] + ops["attn_pre_proj"])
    # the learned position embedding: a second lookup and an add, once per iteration
    rope_twin = GpuCostModel(get_model("opt-66b").model_copy(update={"positional": "rope"}), get_gpu("h100-sxm"), 2,
                             get_link("nvlink4"), GpuModelParams())  # fmt: skip
    assert opt.embedding(64) == pytest.approx(rope_twin.embedding(64) + ops["emb"] + ops["add"])
    config = {"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "ffn_dim": 256, "vocab_size": 100}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert get_model(str(tmp_path)).positional == "learned"


def test_allreduce_is_a_ring_of_link_latencies_above_a_floor():
    """Item 10: 2(t-1) ring steps, each a link latency and 1/t of the message, never under the measured floor."""
    link = get_link("nvlink4")
    g = model(tp=8, allreduce_floor_s=0.0, allreduce_bw_fraction=1.0)
    assert g.allreduce(2.0) == pytest.approx(14 * (link.latency_s + 2.0 / 8 / link.bw))
    assert g.allreduce(64e6) == pytest.approx(14 * link.latency_s + 14 / 8 * 64e6 / link.bw)
    p = GpuModelParams()
    assert model(tp=8).allreduce(2048) == p.allreduce_floor_s
    assert model(tp=8).allreduce(64e6) == pytest.approx(14 * link.latency_s + 14 / 8 * 64e6 / (
        p.allreduce_bw_fraction * link.bw))  # fmt: skip
    assert model(tp=1).allreduce(64e6) == 0


def test_decode_attention_linear_in_context():
    g = model(kernel_overhead_s=0.0)
    a = g.layer(8, 8, np.array([1e4, 2e4, 4e4]), 0.0, 0.0).decode_attn
    np.testing.assert_allclose(a / a[0], [1, 2, 4])


def test_tensor_parallel_adds_allreduce_and_splits_work():
    one, two = model(tp=1), model(tp=2)
    assert np.all(one.allreduce(np.array([1, 100])) == 0)
    assert np.all(two.allreduce(np.array([1, 100])) > 0)
    assert two.gemm(2048, 12288 // 2, 4096) < one.gemm(2048, 12288, 4096)


DATA = find_profiles()
needs_profiles = pytest.mark.skipif(DATA is None, reason="measured GPU profiles not found (shared/data/gpu_profiles)")
needs_network_profile = pytest.mark.skipif(DATA is None or not (DATA.parents[1] / ALLREDUCE_REL).is_file(),
                                           reason="measured all-reduce profile not found")  # fmt: skip


@needs_profiles
def test_gemm_error_against_measured_h100_profiles():
    points = profile_points(DATA, ops=GEMMS)
    table = error_table(points)
    assert set(table["model"]) == set(PROFILE_MODELS)
    assert (table["median_abs_error"] <= 0.15).all(), table
    pooled = error_table(points, by=("operator",))
    assert (pooled["median_abs_error"] <= 0.10).all() and (pooled["p90_abs_error"] <= 0.25).all(), pooled


@needs_profiles
def test_memory_kernel_error_against_measured_h100_profiles():
    pooled = error_table(profile_points(DATA, ops=tuple(MEMORY_OPS)), by=("operator",)).set_index("operator")
    assert set(pooled.index) == set(MEMORY_OPS)
    assert (pooled["median_abs_error"] <= 0.10).all(), pooled


@needs_network_profile
def test_allreduce_error_against_measured_h100_profile():
    pooled = error_table(profile_points(DATA, ops=("all_reduce",)), by=("operator",))
    assert pooled["median_abs_error"].iloc[0] <= 0.10, pooled


@needs_network_profile
def test_profile_derived_parameters_are_the_defaults():
    """Every parameter said to come from the profiles is what gpu_profiles recomputes from them."""
    assert derived_params(DATA) == GpuModelParams()


def test_profile_finder_handles_missing_dir(tmp_path: Path):
    assert find_profiles(tmp_path / "nowhere") is None
