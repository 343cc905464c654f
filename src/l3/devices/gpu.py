"""Analytic GPU cost model: per-operator roofline with tile and wave quantisation and kernel latencies.

- A GEMM runs as the fastest of several (output tile shape, split-K factor) candidates, as cuBLAS's heuristics
  pick a kernel: whole tiles run in whole waves over the SMs at `compute_util` of the peak tensor-core rate, each
  tile paying a fixed latency, against the memory time of weights, activations and split-K partials at
  `memory_util` of HBM bandwidth.
- Norms, rotary embedding, activation, residual add and embedding lookup are memory-bound kernels, each class with
  its own one-token latency and achieved fraction of HBM bandwidth (derived from measured H100 kernel times).
- A tensor-parallel all-reduce is a ring over NVLink: 2(t-1) steps of a link latency and 1/t of the message each,
  never under a measured per-collective floor.

All functions take token counts as scalars or numpy arrays (broadcast), so a run of decode steps can be
evaluated at once. Times are seconds for one replica (one TP group); all GPUs of a group work in parallel.
Sources and derivations of every parameter: docs/gpu-model.md (recomputed by bench/gpu_model_error.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field, PositiveInt

from l3.specs.base import SpecModel
from l3.specs.hardware import GpuSpec, LinkSpec
from l3.specs.model import ModelSpec

# Memory-bound operators (the names of the measured profiles) and their kernel class in GpuModelParams.
MEMORY_OPS = {"emb": "emb", "input_layernorm": "norm", "attn_rope": "rope", "post_attention_layernorm": "norm",
              "mlp_act": "act", "add": "add"}  # fmt: skip


Fraction = Annotated[float, Field(gt=0, le=1)]  # a share of a peak rate: (0, 1]
Seconds = Annotated[float, Field(ge=0)]


class MemoryKernel(SpecModel):
    """A class of memory-bound kernels: time = max(latency_s, bytes / (fraction x peak HBM bandwidth)), the fraction
    being `l2_bw_fraction` while the kernel's bytes fit in the GPU's L2 cache (its input, just written by the
    kernel before, is still there) and the class gains from it, else `bw_fraction`."""

    latency_s: Seconds  # seconds the kernel takes however little it moves (its one-token time)
    bw_fraction: Fraction  # achieved fraction of the GPU's peak HBM bandwidth once bandwidth-bound
    # achieved rate, as a fraction of peak HBM bandwidth (above 1 where L2 outruns HBM), while the bytes fit in L2;
    # None for a class that runs no faster there
    l2_bw_fraction: Annotated[float, Field(gt=0)] | None = None


class GpuModelParams(SpecModel):
    """Named parameters of the GPU model (sources and derivations in docs/gpu-model.md).

    Values marked "derived" are recomputed from Vidur's measured H100 profiles by the functions of
    l3.devices.gpu_profiles named beside them (bench/gpu_model_error.py prints them)."""

    compute_util: Fraction = 0.8  # AttAcc's GPU model: 80% of peak FLOP/s
    memory_util: Fraction = 0.85  # AttAcc's GPU model: 85% of peak HBM bandwidth (GEMM and attention traffic)
    # GEMM output tiles (tokens x features): common CUTLASS tensor-core tiles on Ampere/Hopper (assumption)
    gemm_tiles: tuple[tuple[PositiveInt, PositiveInt], ...] = Field(
        default=((64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128)), min_length=1)
    min_split_k: PositiveInt = 256  # split-K (powers of two) never cuts the reduction dimension below this (assumption)
    tile_latency_s: Seconds = 1.6e-6  # per tile: pipeline fill + epilogue; derived: fit_gemm_latencies
    gemm_overhead_s: Seconds = 5.2e-6  # per GEMM kernel: launch and tail; derived: fit_gemm_latencies
    kernel_overhead_s: Seconds = 1.5e-6  # fixed latency of the kernels the profiles lack: attention, merge (assumption)
    # memory-bound kernel classes; derived: derive_memory_kernels
    norm: MemoryKernel = MemoryKernel(latency_s=6e-6, bw_fraction=0.332, l2_bw_fraction=0.387)
    rope: MemoryKernel = MemoryKernel(latency_s=3e-6, bw_fraction=0.463)
    act: MemoryKernel = MemoryKernel(latency_s=3e-6, bw_fraction=0.572)
    add: MemoryKernel = MemoryKernel(latency_s=1e-6, bw_fraction=0.984, l2_bw_fraction=1.04)
    emb: MemoryKernel = MemoryKernel(latency_s=2e-6, bw_fraction=0.178)
    allreduce_floor_s: Seconds = 38e-6  # least time of one all-reduce; derived: derive_allreduce
    allreduce_bw_fraction: Fraction = 0.72  # achieved share of NVLink bandwidth in the ring; derived: derive_allreduce


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer's time on one replica, split where L3 splits the work (seconds)."""

    pre_attn: np.ndarray  # input norm + QKV projection + rotary embedding (rope models)
    prefill_attn: np.ndarray  # causal attention of prefill chunks (GPU in every system)
    decode_attn: np.ndarray  # attention of decode tokens over their KV (GPU only in gpu-only)
    post_attn: np.ndarray  # output projection + all-reduce + norm + FFN + all-reduce + residual add

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
        self._gemm_candidates: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        # GEMM weight elements one GPU holds: per decoder layer, and of the vocabulary projection
        self._layer_weights = sum(n * k for n, k in self.gemm_shapes().values())
        self._vocab_weights = model.vocab_size // tp * model.d_model

    # --- operator primitives ----------------------------------------------------------------------
    def _candidates(self, n: int, k: int) -> tuple[np.ndarray, ...]:
        """Kernel candidates of a GEMM with a k x n weight, one entry per (tile shape, split-K factor): tile rows
        (tokens), tiles per tile row (n tiles x split), seconds per tile, and HBM bytes per token (activation in,
        output and FP32 split-K partials written and read back). Cached per (n, k)."""
        if (n, k) not in self._gemm_candidates:
            splits = [s for s in (2**i for i in range(11)) if s == 1 or k // s >= self.p.min_split_k]
            tm, tn, s = np.array([(a, b, s) for a, b in self.p.gemm_tiles for s in splits], dtype=float).T
            tile_s = self.p.tile_latency_s + 2.0 * tm * tn * np.ceil(k / s) / self._sm_flops
            row_bytes = (k + n) * self.model.dtype_bytes + np.where(s > 1, 2.0 * 4 * n * s, 0.0)
            self._gemm_candidates[n, k] = (tm, np.ceil(n / tn) * s, tile_s, row_bytes)
        return self._gemm_candidates[n, k]

    def gemm(self, m, n: int, k: int) -> np.ndarray:
        """Time of an (m x k) @ (k x n) GEMM on one GPU, seconds; m (tokens) may be an array.

        Each candidate kernel cuts the output into tiles of one shape and the reduction into a split-K factor;
        its tiles run in whole waves over the SMs, and it takes the longer of that compute time and its memory
        time. The GEMM takes the fastest candidate, plus the kernel's fixed overhead.
        """
        m = np.asarray(m, dtype=float)
        tm, cols, tile_s, row_bytes = self._candidates(n, k)
        rows = m[..., None]
        waves = np.ceil(np.ceil(rows / tm) * cols / self.gpu.sm_count)
        memory = (k * n * self.model.dtype_bytes + rows * row_bytes) / self._bw
        t = np.maximum(waves * tile_s, memory).min(axis=-1)
        return np.where(m > 0, t + self.p.gemm_overhead_s, 0.0)

    def memory_kernel(self, kind: str, nbytes) -> np.ndarray:
        """Time of one memory-bound kernel of class `kind` (norm, rope, act, add, emb) moving `nbytes` bytes of HBM
        traffic, seconds: its latency, or its traffic at the class's achieved bandwidth (the in-L2 one while the bytes
        fit in the L2 cache), whichever is longer."""
        c: MemoryKernel = getattr(self.p, kind)
        nbytes = np.asarray(nbytes, dtype=float)
        fraction = c.bw_fraction
        if c.l2_bw_fraction is not None:
            fraction = np.where(nbytes <= self.gpu.l2_bytes, c.l2_bw_fraction, c.bw_fraction)
        return np.where(nbytes > 0, np.maximum(c.latency_s, nbytes / (fraction * self.gpu.hbm_bw)), 0.0)

    def allreduce(self, nbytes) -> np.ndarray:
        """Ring all-reduce of `nbytes` bytes per GPU over the TP group of t GPUs, seconds: 2(t-1) steps, each a
        link latency plus 1/t of the message at `allreduce_bw_fraction` of the NVLink bandwidth, and never less
        than `allreduce_floor_s`."""
        nbytes = np.asarray(nbytes, dtype=float)
        if self.tp == 1:
            return np.zeros_like(nbytes)
        step = self.nvlink.latency_s + nbytes / self.tp / (self.p.allreduce_bw_fraction * self.nvlink.bw)
        return np.where(nbytes > 0, np.maximum(self.p.allreduce_floor_s, 2.0 * (self.tp - 1) * step), 0.0)

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

    def _hidden_bytes(self, m) -> np.ndarray:
        """Bytes of m tokens' hidden states."""
        return np.asarray(m, dtype=float) * self.model.d_model * self.model.dtype_bytes

    def memory_op_bytes(self, m) -> dict[str, np.ndarray]:
        """HBM bytes of each memory-bound operator the model has (MEMORY_OPS) for m tokens on one GPU: norms read
        and write the hidden state; rotary embedding (rope models only) rewrites this GPU's Q and K; the activation
        reads its input (two halves if gated) and writes the output; the residual add reads two hidden states and
        writes one; the embedding lookup reads a table row per token and writes it."""
        md, t = self.model, self.tp
        hidden = self._hidden_bytes(m)
        ffn = np.asarray(m, dtype=float) * (md.ffn_dim // t) * md.dtype_bytes
        out = {"emb": 2.0 * hidden, "input_layernorm": 2.0 * hidden, "post_attention_layernorm": 2.0 * hidden,
               "mlp_act": (3.0 if md.ffn_kind == "gated" else 2.0) * ffn, "add": 3.0 * hidden}  # fmt: skip
        if md.positional == "rope":
            out["attn_rope"] = 2.0 * np.asarray(m, dtype=float) * ((md.q_dim + md.kv_dim) // t) * md.dtype_bytes
        return out

    def op_times(self, m) -> dict[str, np.ndarray]:
        """Each profiled operator the model has, for m tokens on one GPU of the TP group, seconds: the per-layer
        ones, and the token lookup `emb` (charged once per iteration, by `embedding`)."""
        ops = {name: self.gemm(m, n, k) for name, (n, k) in self.gemm_shapes().items()}
        ops |= {op: self.memory_kernel(MEMORY_OPS[op], b) for op, b in self.memory_op_bytes(m).items()}
        ops["all_reduce"] = self.allreduce(self._hidden_bytes(m))
        return ops

    def weight_read_s(self) -> tuple[float, float]:
        """Seconds to read one GPU's share of the decoder layers' GEMM weights, and of the vocabulary projection."""
        md = self.model
        return (md.n_layers * self._layer_weights * md.dtype_bytes / self._bw,
                self._vocab_weights * md.dtype_bytes / self._bw)  # fmt: skip

    def energy(self, n_tokens, n_sampled, attn_flops, attn_bytes, passes=1.0, kv_write_bytes=0.0) -> dict:
        """Dynamic energy (J) of iterations on one TP group (sched.timing.ENERGY_PARTS): `gpu_compute`, the GEMMs'
        FLOPs (as `roofline` counts them) plus `attn_flops` at the GPU's energy per FLOP; `gpu_memory`, HBM bytes:
        every weight used read `passes` times (once per sub-batch), each layer's memory-bound kernels' bytes
        (memory_op_bytes), `attn_bytes` of KV read and `kv_write_bytes` written; `nvlink`, the ring all-reduces'
        bytes (2(t-1)/t of each message per GPU: two per layer and the embedding's). attn_flops, attn_bytes and
        kv_write_bytes are the whole group's."""
        md, t, g = self.model, self.tp, self.gpu
        n_tokens, n_sampled = np.asarray(n_tokens, float), np.asarray(n_sampled, float)
        flops = 2.0 * t * (n_tokens * md.n_layers * self._layer_weights + n_sampled * self._vocab_weights)
        weights = t * md.dtype_bytes * (np.where(n_tokens > 0, md.n_layers * self._layer_weights, 0.0)
                                        + np.where(n_sampled > 0, self._vocab_weights, 0.0)) * passes  # fmt: skip
        kernels = self.memory_op_bytes(n_tokens)
        act = t * (md.n_layers * sum(b for op, b in kernels.items() if op != "emb") + kernels["emb"])
        hbm = weights + act + np.asarray(attn_bytes, float) + np.asarray(kv_write_bytes, float)
        ring = 2.0 * (t - 1) * (2 * md.n_layers + 1) * self._hidden_bytes(n_tokens)
        return {"gpu_compute": (flops + np.asarray(attn_flops, float)) * g.flop_j,
                "gpu_memory": hbm * 8 * g.hbm_pj_per_bit * 1e-12, "nvlink": ring * 8 * self.nvlink.pj_per_bit * 1e-12}

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
        pre = ops["input_layernorm"] + ops["attn_pre_proj"] + ops.get("attn_rope", 0.0)
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

    def embedding(self, m) -> np.ndarray:
        """Embedding of m tokens before the first layer, seconds: the token lookup; for learned absolute positions
        a position lookup and an add; under TP an all-reduce of the hidden states (the token table is split over
        the group by vocabulary: each GPU fills the rows it holds and zeros the others)."""
        b = self.memory_op_bytes(m)
        t = self.memory_kernel("emb", b["emb"]) + self.allreduce(self._hidden_bytes(m))
        if self.model.positional == "learned":
            t = t + self.memory_kernel("emb", b["emb"]) + self.memory_kernel("add", b["add"])
        return t

    def embed_and_head(self, n_tokens, n_sampled) -> np.ndarray:
        """One iteration's work outside the decoder layers, seconds: the embedding of its `n_tokens` tokens and the
        final norm and vocabulary projection of its `n_sampled` sampled tokens."""
        final_norm, vocabulary = self.lm_head(n_sampled)
        return self.embedding(n_tokens) + final_norm + vocabulary

    def lm_head(self, n_sampled) -> tuple[np.ndarray, np.ndarray]:
        """Seconds of the final norm and of the vocabulary projection of `n_sampled` sampled tokens."""
        md = self.model
        final_norm = self.memory_kernel("norm", self.memory_op_bytes(n_sampled)["input_layernorm"])
        return final_norm, self.gemm(n_sampled, md.vocab_size // self.tp, md.d_model)
