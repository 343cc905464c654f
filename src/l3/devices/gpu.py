"""Analytic GPU cost model: per-operator roofline with wave quantisation and kernel overheads.

Each operator's time is max(compute time, memory time) + a fixed kernel overhead, where
- compute time of a GEMM counts the work of whole output tiles in whole waves over the SMs (a GEMM of M
  tokens is padded to tiles of `tile_m x tile_n`; the tiles run in waves of `sm_count`), at `compute_util`
  of the peak tensor-core rate;
- memory time moves weights, activations in and out (and KV for attention) at `memory_util` of HBM bandwidth;
- a tensor-parallel all-reduce is a ring over NVLink: 2 (t-1)/t of the message per GPU plus a fixed latency.

All functions take token counts as scalars or numpy arrays (broadcast), so a run of decode steps can be
evaluated at once. Times are seconds for one replica (one TP group); all GPUs of a group work in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l3.specs.base import SpecModel
from l3.specs.hardware import GpuSpec, LinkSpec
from l3.specs.model import ModelSpec


class GpuModelParams(SpecModel):
    """Named parameters of the GPU model (sources in docs/gpu-model.md)."""

    compute_util: float = 0.8  # AttAcc's GPU model: 80% of peak FLOP/s
    memory_util: float = 0.85  # AttAcc's GPU model: 85% of peak HBM bandwidth
    tile_m: int = 128  # GEMM output tile (tokens), a common Hopper/Ampere tensor-core tile
    tile_n: int = 256  # GEMM output tile (features)
    min_tile_m: int = 16  # skinny GEMMs use tiles no taller than the next power of two >= M
    min_split_k: int = 256  # split-K never cuts the reduction dimension below this many elements
    gemm_overhead_s: float = 4e-6  # pipeline fill + tail of a tiled GEMM kernel (our assumption)
    kernel_overhead_s: float = 1.5e-6  # fixed latency of a simple (elementwise/attention) kernel (assumption)
    allreduce_latency_s: float = 10e-6  # NCCL small-message all-reduce latency on NVLink (our assumption)


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer's time on one replica, split where L3 splits the work (seconds)."""

    pre_attn: np.ndarray  # input norm + QKV projection + rotary embedding
    prefill_attn: np.ndarray  # causal attention of prefill chunks (GPU in every system)
    decode_attn: np.ndarray  # attention of decode tokens over their KV (GPU only in gpu-only)
    post_attn: np.ndarray  # output projection + all-reduce + norm + FFN + all-reduce + residual adds

    @property
    def total(self) -> np.ndarray:
        return self.pre_attn + self.prefill_attn + self.decode_attn + self.post_attn


class GpuCostModel:
    """Per-iteration GPU time of one TP group running `model` (TP degree `tp`)."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec, tp: int, nvlink: LinkSpec, params: GpuModelParams):
        self.model, self.gpu, self.tp, self.nvlink, self.p = model, gpu, tp, nvlink, params
        self._flops = gpu.peak_flops * params.compute_util
        self._bw = gpu.hbm_bw * params.memory_util
        self._sm_flops = self._flops / gpu.sm_count
        # GEMM weight elements one GPU holds: per decoder layer, and of the vocabulary projection
        self._layer_weights = sum(n * k for n, k in self.gemm_shapes().values())
        self._vocab_weights = model.vocab_size // tp * model.d_model

    # --- operator primitives ----------------------------------------------------------------------
    def gemm(self, m, n: int, k: int) -> np.ndarray:
        """Time of an (m x k) @ (k x n) GEMM on one GPU; m may be an array (tokens).

        Output tiles of `tile_m x tile_n` (tile_m shrinks to the next power of two >= m for skinny GEMMs) run
        in whole waves over the SMs. When there are fewer tiles than SMs the reduction dimension is split
        (split-K) to fill them, at the cost of writing and re-reading FP32 partial outputs.
        """
        m = np.asarray(m, dtype=float)
        p, sms = self.p, self.gpu.sm_count
        tm = np.clip(2.0 ** np.ceil(np.log2(np.maximum(m, 1))), p.min_tile_m, p.tile_m)
        tiles = np.ceil(m / tm) * np.ceil(n / p.tile_n)
        split = np.clip(np.floor(sms / np.maximum(tiles, 1)), 1, max(1, k // p.min_split_k))
        waves = np.ceil(tiles * split / sms)
        t_compute = waves * 2.0 * tm * p.tile_n * np.ceil(k / split) / self._sm_flops
        partials = np.where(split > 1, 2.0 * m * n * split * 4, 0.0)  # FP32 partials written and read back
        t_memory = ((k * n + m * k + m * n) * self.model.dtype_bytes + partials) / self._bw
        return np.where(m > 0, np.maximum(t_compute, t_memory) + p.gemm_overhead_s, 0.0)

    def elementwise(self, m, width: int, passes: float = 2.0) -> np.ndarray:
        """Memory-bound kernel touching `passes` x (m x width) elements (read + write = 2)."""
        m = np.asarray(m, dtype=float)
        t = passes * m * width * self.model.dtype_bytes / self._bw
        return np.where(m > 0, t + self.p.kernel_overhead_s, 0.0)

    def allreduce(self, m) -> np.ndarray:
        """Ring all-reduce of m tokens' hidden states over the TP group."""
        m = np.asarray(m, dtype=float)
        if self.tp == 1:
            return np.zeros_like(m)
        nbytes = m * self.model.d_model * self.model.dtype_bytes
        t = 2.0 * (self.tp - 1) / self.tp * nbytes / self.nvlink.bw + self.p.allreduce_latency_s
        return np.where(m > 0, t, 0.0)

    def merge_partials(self, read_bytes, write_bytes) -> np.ndarray:
        """Memory-bound kernel merging partial attention outputs (log-sum-exp rescale and sum): reads
        `read_bytes` of partials and writes `write_bytes` of outputs, whole TP group (heads split over it)."""
        nbytes = (np.asarray(read_bytes, float) + np.asarray(write_bytes, float)) / self.tp
        return np.where(nbytes > 0, nbytes / self._bw + self.p.kernel_overhead_s, 0.0)

    def attention(self, flops, kv_bytes, active) -> np.ndarray:
        """Fused attention kernel: roofline of its FLOPs and KV bytes (per GPU), zero if not active."""
        t = np.maximum(np.asarray(flops, float) / self._flops, np.asarray(kv_bytes, float) / self._bw)
        return np.where(active, t + self.p.kernel_overhead_s, 0.0)

    # --- per-layer operators (the names of the measured profiles) ---------------------------------
    def gemm_shapes(self) -> dict[str, tuple[int, int]]:
        """(n, k) of each per-layer GEMM on one GPU of the TP group (its weight is k x n)."""
        md, t = self.model, self.tp
        ffn_shard = md.ffn_dim // t
        up_n = (2 if md.ffn_kind == "gated" else 1) * ffn_shard
        return {"attn_pre_proj": ((md.q_dim + 2 * md.kv_dim) // t, md.d_model),
                "attn_post_proj": (md.d_model, md.q_dim // t), "mlp_up_proj": (up_n, md.d_model),
                "mlp_down_proj": (md.d_model, ffn_shard)}  # fmt: skip

    def op_times(self, m) -> dict[str, np.ndarray]:
        """Dense per-layer operators for m tokens on one GPU of the TP group."""
        md, t = self.model, self.tp
        ffn_shard = md.ffn_dim // t
        g = {name: self.gemm(m, n, k) for name, (n, k) in self.gemm_shapes().items()}
        return {
            "input_layernorm": self.elementwise(m, md.d_model),
            "attn_pre_proj": g["attn_pre_proj"],
            "attn_rope": self.elementwise(m, (md.q_dim + md.kv_dim) // t),
            "attn_post_proj": g["attn_post_proj"],
            "post_attention_layernorm": self.elementwise(m, md.d_model),
            "mlp_up_proj": g["mlp_up_proj"],
            "mlp_act": self.elementwise(m, ffn_shard, passes=3.0 if md.ffn_kind == "gated" else 2.0),
            "mlp_down_proj": g["mlp_down_proj"],
            "add": self.elementwise(m, md.d_model, passes=3.0),
            "all_reduce": self.allreduce(m),
        }

    def weight_read_s(self) -> tuple[float, float]:
        """Seconds to read one GPU's share of the decoder layers' GEMM weights, and of the vocabulary projection."""
        md = self.model
        return (md.n_layers * self._layer_weights * md.dtype_bytes / self._bw,
                self._vocab_weights * md.dtype_bytes / self._bw)  # fmt: skip

    def roofline(self, n_tokens, n_sampled, attn_flops, attn_bytes) -> np.ndarray:
        """A lower bound on one iteration's GPU time (all layers, one TP group), seconds: the GEMMs' FLOPs plus
        `attn_flops` at the achievable FLOP rate, or every weight used read once plus `attn_bytes` at the
        achievable HBM bandwidth, whichever is longer. No tile padding, kernel latency, norms or all-reduce, so
        every iteration the model times takes at least this. attn_flops / attn_bytes: attention work done on
        the GPUs over all layers, whole TP group (split evenly over its GPUs)."""
        md = self.model
        n_tokens, n_sampled = np.asarray(n_tokens, float), np.asarray(n_sampled, float)
        flops = 2.0 * (n_tokens * md.n_layers * self._layer_weights + n_sampled * self._vocab_weights)
        compute = (flops + np.asarray(attn_flops, float) / self.tp) / self._flops
        layers_s, vocab_s = self.weight_read_s()
        weights = np.where(n_tokens > 0, layers_s, 0.0) + np.where(n_sampled > 0, vocab_s, 0.0)
        memory = weights + np.asarray(attn_bytes, float) / self.tp / self._bw
        return np.maximum(compute, memory)

    def layer(self, n_tokens, n_decode, decode_ctx, prefill_pairs, prefill_kv_tokens) -> LayerCost:
        """One layer's cost for an iteration.

        n_tokens: tokens through the dense layers (prefill chunk tokens + decode tokens);
        n_decode: decode requests; decode_ctx: sum of their context lengths (tokens attended);
        prefill_pairs: causal query-key pairs of the prefill chunks; prefill_kv_tokens: KV tokens read by them.
        """
        ops = self.op_times(n_tokens)
        pre = ops["input_layernorm"] + ops["attn_pre_proj"] + ops["attn_rope"]
        post = (ops["attn_post_proj"] + ops["post_attention_layernorm"] + ops["mlp_up_proj"] + ops["mlp_act"]
                + ops["mlp_down_proj"] + ops["add"] + 2.0 * ops["all_reduce"])  # fmt: skip
        prefill = self.prefill_attention(prefill_pairs, prefill_kv_tokens)
        return LayerCost(pre, prefill, self.decode_attention(n_decode, decode_ctx), post)

    def prefill_attention(self, pairs, kv_tokens) -> np.ndarray:
        """One layer's causal attention of prefill chunks: `pairs` query-key pairs reading `kv_tokens` of KV."""
        md, t = self.model, self.tp
        pairs = np.asarray(pairs, float)
        return self.attention(4.0 * pairs * md.head_dim * md.n_heads / t,
                              np.asarray(kv_tokens, float) * md.kv_bytes_per_token_layer / t, pairs > 0)  # fmt: skip

    def decode_attention(self, n_decode, decode_ctx) -> np.ndarray:
        """One layer's decode attention of `n_decode` requests attending `decode_ctx` tokens in all (KV in HBM)."""
        md, t = self.model, self.tp
        decode_ctx = np.asarray(decode_ctx, float)
        return self.attention(4.0 * decode_ctx * md.head_dim * md.n_heads / t,
                              decode_ctx * md.kv_bytes_per_token_layer / t, np.asarray(n_decode) > 0)  # fmt: skip

    def attention_work(self, pairs, kv_tokens) -> tuple[np.ndarray, np.ndarray]:
        """FLOPs and KV bytes of attention over all layers (whole TP group): `pairs` query-key pairs per layer
        (a decode request: its context) reading `kv_tokens` tokens of KV per layer."""
        md = self.model
        return (4.0 * md.n_layers * np.asarray(pairs, float) * md.head_dim * md.n_heads,
                md.n_layers * np.asarray(kv_tokens, float) * md.kv_bytes_per_token_layer)  # fmt: skip

    def lm_head(self, n_sampled) -> np.ndarray:
        """Final norm + vocabulary projection for the tokens that are sampled."""
        md = self.model
        return self.elementwise(n_sampled, md.d_model) + self.gemm(
            n_sampled, md.vocab_size // self.tp, md.d_model
        )
