"""Compare the GPU cost model with measured H100 kernel times (Vidur's profiles, MIT licence), and derive the model
parameters that come from them.

The compute profiles time each operator of one decoder layer for 1..4096 tokens at TP 1/2/4/8; the model shape
comes from the profile's own config columns, so any profiled model can be checked. The network profile times NCCL
all-reduces of 2 KB..64 MB over 2, 4 and 8 GPUs of a DGX H100.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from l3.devices.gpu import MEMORY_OPS, GpuCostModel, GpuModelParams, MemoryKernel
from l3.errors import WorkloadError
from l3.specs.hardware import get_gpu, get_link
from l3.specs.model import ModelSpec, get_model
from l3.workload.registry import find_data_dir

PROFILE_MODELS = ("Llama-2-7b-hf", "Llama-2-70b-hf", "CodeLlama-34b-Instruct-hf", "internlm-20b", "Qwen-72B",
                  "phi-2")  # fmt: skip
GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
OTHERS = (*MEMORY_OPS, "all_reduce")
REL = Path("gpu_profiles/vidur/compute/h100")
ALLREDUCE_REL = Path("network/h100_dgx/all_reduce.csv")  # beside compute/ under gpu_profiles/vidur
GPU, LINK = "h100-sxm", "nvlink4"
BANDWIDTH_TOKENS = 2048  # memory-bound kernels at >= this many tokens give their achieved bandwidth
L2_TOKENS = 256  # ... and those fitting in L2 at >= this many tokens (fewer are latency-bound) their in-L2 rate
SMALL_MESSAGE_BYTES = 2**20  # all-reduces up to this size give the per-collective floor
LARGE_MESSAGE_BYTES = 16 * 2**20  # all-reduces from this size give the ring's achieved bandwidth


def find_profiles(root: Path | None = None) -> Path | None:
    """The H100 profile folder under `root` (a `shared/data` folder), else beside the trace data folder that
    the workloads find ($L3_DATA_DIR or a `shared/data/traces` above); None when there is none."""
    if root is None:
        try:
            root = find_data_dir().parent
        except WorkloadError:
            return None
    return root / REL if (root / REL).is_dir() else None


@functools.lru_cache(maxsize=16)
def _read(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv)


def _spec_from_row(name: str, row: pd.Series) -> ModelSpec:
    heads = int(row["n_head"])
    return ModelSpec(name=name, n_layers=1, d_model=int(row["n_embd"]), n_heads=heads,
                     n_kv_heads=int(row["n_kv_head"]), head_dim=int(row["n_embd"]) // heads,
                     ffn_dim=int(row["n_expanded_embd"]), ffn_kind="gated" if bool(row["use_gated_mlp"]) else "plain",
                     vocab_size=int(row["vocab_size"]))  # fmt: skip


def profile_points(profiles: Path, params: GpuModelParams | None = None, ops=GEMMS + OTHERS) -> pd.DataFrame:
    """One row per measured point of operators `ops`: model, tp, tokens, operator, bytes (HBM traffic of a
    memory-bound kernel; the message of an all-reduce), measured and modelled seconds of one kernel, rel_error.

    A profile without post_attention_layernorm is of a parallel attention + MLP block (phi-2), whose timed `add`
    is two add kernels (attention + MLP + residual): its measured time is halved to give one kernel's."""
    params = params or GpuModelParams()
    frames = []
    for csv in sorted(profiles.glob("*/*/mlp.csv")):
        df = _read(csv)
        spec = _spec_from_row(csv.parent.name, df.iloc[0])
        parallel = "time_stats.post_attention_layernorm.median" not in df
        for tp, grp in df.groupby("num_tensor_parallel_workers"):
            cost = GpuCostModel(spec, get_gpu(GPU), int(tp), get_link(LINK), params)
            tokens = grp["num_tokens"].to_numpy()
            modelled, nbytes = cost.op_times(tokens), cost.memory_op_bytes(tokens)
            for op in ops:
                if f"time_stats.{op}.median" not in grp:
                    continue
                measured = grp[f"time_stats.{op}.median"].to_numpy() * 1e-3 / (2 if parallel and op == "add" else 1)
                frames.append(pd.DataFrame({
                    "model": spec.name, "tp": int(tp), "tokens": tokens, "operator": op,
                    "bytes": nbytes.get(op, np.nan), "measured_s": measured, "modelled_s": modelled[op]}))  # fmt: skip
    if "all_reduce" in ops and (profiles.parents[1] / ALLREDUCE_REL).is_file():
        df = _read(profiles.parents[1] / ALLREDUCE_REL)
        for tp, grp in df.groupby("num_workers"):  # the all-reduce takes message bytes: any model spec will do
            cost = GpuCostModel(get_model("llama-2-7b"), get_gpu(GPU), int(tp), get_link(LINK), params)
            size = grp["size"].to_numpy(dtype=float)
            frames.append(pd.DataFrame({
                "model": "h100_dgx", "tp": int(tp), "tokens": np.nan, "operator": "all_reduce", "bytes": size,
                "measured_s": grp["time_stats.all_reduce.median"].to_numpy() * 1e-3,
                "modelled_s": cost.allreduce(size)}))  # fmt: skip
    out = pd.concat(frames, ignore_index=True)
    out["rel_error"] = (out["modelled_s"] - out["measured_s"]) / out["measured_s"]
    return out


def error_table(points: pd.DataFrame, by=("model", "operator")) -> pd.DataFrame:
    """Per group: median |error|, median signed error, p90 |error|, max |error| and number of points."""
    g = points.assign(abs_error=points["rel_error"].abs()).groupby(list(by))
    return pd.DataFrame({
        "median_abs_error": g["abs_error"].median(), "median_error": g["rel_error"].median(),
        "p90_abs_error": g["abs_error"].quantile(0.9), "max_abs_error": g["abs_error"].max(), "points": g.size(),
    }).reset_index()  # fmt: skip


def derive_memory_kernels(profiles: Path) -> dict[str, MemoryKernel]:
    """Each memory-bound kernel class's parameters from the profiles' points of its operators (all models and TP
    degrees), with rate = the kernel's bytes / (time x peak HBM bandwidth): latency_s is the median time at 1
    token; bw_fraction the median rate of the points of at least BANDWIDTH_TOKENS tokens whose bytes exceed the
    L2 cache; l2_bw_fraction the median rate of those of at least L2_TOKENS tokens whose bytes fit in it, kept
    only where it is the higher of the two (elsewhere the smaller sizes are slower for reasons other than L2)."""
    pts = profile_points(profiles, ops=tuple(MEMORY_OPS))
    pts["kind"] = pts["operator"].map(MEMORY_OPS)
    gpu, out = get_gpu(GPU), {}
    for kind, g in pts.groupby("kind"):
        rate = g["bytes"] / g["measured_s"] / gpu.hbm_bw
        fits = g["bytes"] <= gpu.l2_bytes
        hbm = round(float(rate[(g["tokens"] >= BANDWIDTH_TOKENS) & ~fits].median()), 3)
        l2 = round(float(rate[(g["tokens"] >= L2_TOKENS) & fits].median()), 3)
        out[kind] = MemoryKernel(latency_s=round(float(g.loc[g["tokens"] == 1, "measured_s"].median()), 7),
                                 bw_fraction=hbm, l2_bw_fraction=l2 if l2 > hbm else None)
    return out


def derive_allreduce(profiles: Path) -> tuple[float, float]:
    """(allreduce_floor_s, allreduce_bw_fraction) from the DGX H100 all-reduce profile (2, 4 and 8 GPUs): the floor
    is the median time of messages up to SMALL_MESSAGE_BYTES; the fraction is the median, over messages of at
    least LARGE_MESSAGE_BYTES, of the ring's bytes per GPU 2(t-1)/t x size / ((time - 2(t-1) x link latency) x
    link bandwidth)."""
    df, link = _read(profiles.parents[1] / ALLREDUCE_REL), get_link(LINK)
    t, size = df["num_workers"].to_numpy(dtype=float), df["size"].to_numpy(dtype=float)
    time = df["time_stats.all_reduce.median"].to_numpy() * 1e-3
    big = size >= LARGE_MESSAGE_BYTES
    steps = 2.0 * (t[big] - 1)
    fraction = np.median(steps / t[big] * size[big] / ((time[big] - steps * link.latency_s) * link.bw))
    return round(float(np.median(time[size <= SMALL_MESSAGE_BYTES])), 7), round(float(fraction), 3)


def fit_gemm_latencies(profiles: Path) -> tuple[float, float]:
    """(tile_latency_s, gemm_overhead_s) minimising the sum of squared relative errors over every GEMM point of the
    profiles: tile_latency_s on a 0.1 us grid over [0, 5 us]; for each, gemm_overhead_s (a constant added to
    every GEMM) in closed form, sum((measured - modelled) / measured^2) / sum(1 / measured^2)."""
    best = (np.inf, 0.0, 0.0)
    for tile in np.arange(51) * 1e-7:
        pts = profile_points(profiles, GpuModelParams(tile_latency_s=tile, gemm_overhead_s=0.0), ops=GEMMS)
        y, x = pts["measured_s"].to_numpy(), pts["modelled_s"].to_numpy()
        overhead = float(np.sum((y - x) / y**2) / np.sum(1.0 / y**2))
        best = min(best, (float(np.sum(((x + overhead - y) / y) ** 2)), round(float(tile), 7), round(overhead, 7)))
    return best[1], best[2]


def derived_params(profiles: Path) -> GpuModelParams:
    """GpuModelParams with every profile-derived value recomputed (the others at their defaults)."""
    tile, overhead = fit_gemm_latencies(profiles)
    floor, fraction = derive_allreduce(profiles)
    return GpuModelParams(tile_latency_s=tile, gemm_overhead_s=overhead, allreduce_floor_s=floor,
                          allreduce_bw_fraction=fraction, **derive_memory_kernels(profiles))  # fmt: skip
