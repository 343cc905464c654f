"""GPU cost model: roofline mechanisms and agreement with measured H100 operator times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from l3.devices.gpu import GpuCostModel, GpuModelParams
from l3.devices.gpu_profiles import PROFILE_MODELS, find_profiles, gemm_error_table
from l3.specs.hardware import get_gpu, get_link
from l3.specs.model import get_model


def model(name="llama-2-7b", tp=1, **params):
    return GpuCostModel(
        get_model(name), get_gpu("h100-sxm"), tp, get_link("nvlink4"), GpuModelParams(**params)
    )


def test_large_gemm_is_compute_bound_at_the_cap():
    g = model(gemm_overhead_s=0.0)
    m, n, k = 10 * 128, 132 * 256, 4096  # exactly 10 waves of 128x256 tiles on 132 SMs
    ideal = 2 * m * n * k / (989.4e12 * 0.8)
    assert g.gemm(m, n, k) == pytest.approx(ideal, rel=0.01)  # tile-aligned: no quantisation loss


def test_skinny_gemm_is_memory_bound():
    g = model(gemm_overhead_s=0.0)
    n = k = 8192
    split = 132 // (n // 256)  # 32 tiles on 132 SMs: split-K by 4, FP32 partials written and read back
    assert g.gemm(1, n, k) == pytest.approx(((n * k + n + k) * 2 + 2 * n * split * 4) / (3.35e12 * 0.85), rel=1e-6)


def test_wave_quantisation_makes_time_a_step_function():
    g = model(min_split_k=1 << 30)  # no split-K: time is monotone in tokens
    m = np.arange(1, 4097)
    t = g.gemm(m, 12288, 4096)
    assert np.all(np.diff(t) >= -1e-15)  # never faster with more tokens
    # one more tile row than fits a wave costs a whole extra wave
    assert g.gemm(129 * 8, 12288, 4096) > g.gemm(128 * 8, 12288, 4096)


def test_split_k_fills_idle_sms_for_small_gemms():
    few_tiles = dict(m=144, n=1280, k=8192)  # 10 output tiles for 132 SMs
    assert model().gemm(**few_tiles) < 0.5 * model(min_split_k=1 << 30).gemm(**few_tiles)


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


@pytest.mark.skipif(DATA is None, reason="measured GPU profiles not found (../shared/data/gpu_profiles)")
def test_gemm_error_against_measured_h100_profiles():
    table = gemm_error_table(DATA)
    assert set(table["model"]) == set(PROFILE_MODELS)
    for (_, op), grp in table.groupby(["model", "operator"]):
        assert grp["median_abs_error"].iloc[0] <= 0.15, (op, grp)


def test_profile_finder_handles_missing_dir(tmp_path: Path):
    assert find_profiles(tmp_path / "nowhere") is None
