"""Attention backends of the engine: where the KV cache lives and who computes attention over it.

- `gpu`: the KV in paged blocks on the dense device, attention there (the reference). Where the dense device is
  the CPU, decodes run in the fused host kernel (`host_kernel`) over their keys in place, as the `cpu` backend's.
- `cpu`: the KV in paged blocks in host memory (storage in `kv_dtype`, e.g. fp16), attention by host threads
  with fp32 accumulation; the commodity stand-in for DIMM-PIM (as NEO and FastDecode do). A long decode's keys
  are cut into pieces of contiguous tokens read in place; each piece gives a partial (running max, sum,
  unnormalised output) and the partials merge exactly (log-sum-exp), as a token-striped request's partials from
  several PIM ranks do. Prefill chunks (compute-bound) attend over their gathered keys with PyTorch's fused
  attention, as on the `gpu` backend.
- `pim`: the project's functional DIMM-PIM model (`devices.pim.functional`): KV written through the mapping and
  re-layout into bank bytes, decode attention in the bank/rank PU arithmetic with chunked softmax; prefill
  chunks attend in fp32 over the KV read back from the banks (FP16), on the host.

A backend is called once per layer with the batch's Q, K, V (after `bind` told it the batch's segments; `bound`
gives a view with a binding of its own, for a second sub-batch in flight); it stores K and V first, then attends.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.nn.attention.bias import causal_lower_right

from l3.engine import BACKEND_NAMES, host_kernel, host_memory

PIECE_TOKENS = 1024  # keys per partial in the cpu backend: a piece's fp32 copy (a few MB at most) stays in cache


@dataclass(frozen=True)
class Segment:
    """One request's rows of a flat batch: rows [start, start + n) hold its tokens at positions ctx0 .. ctx0 +
    n - 1; after this batch it holds ctx0 + n tokens of KV, in `blocks` (block ids in token order)."""

    rid: int
    start: int
    n: int
    ctx0: int
    blocks: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.ctx0 + self.n


def _slots(blocks, lo: int, hi: int, block_size: int) -> np.ndarray:
    """Storage slots of positions lo .. hi - 1."""
    pos = np.arange(lo, hi)
    return np.asarray(blocks, np.int64)[pos // block_size] * block_size + pos % block_size


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(n, m) True where query position may see key position: causal, and within the sliding window if any."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok &= k_pos[None, :] > q_pos[:, None] - window
    return ok


_local = threading.local()  # per-thread fp32 buffers the cpu backend widens stored KV pieces into


def _as_fp32(x: torch.Tensor, slot: int) -> torch.Tensor:
    """`x` (KVH, m, E) in fp32: itself if it already is, else widened into this thread's reused buffer `slot`
    (a fresh tensor per piece would cost page faults that dwarf the copy)."""
    if x.dtype == torch.float32:
        return x
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (slot, torch.is_inference_mode_enabled())  # a buffer made in inference mode is written only there
    buf = bufs.get(key)
    if buf is None or buf.shape[0] != x.shape[0] or buf.shape[2] != x.shape[2] or buf.shape[1] < x.shape[1]:
        buf = bufs[key] = torch.empty(x.shape[0], max(x.shape[1], PIECE_TOKENS), x.shape[2])
    out = buf[:, : x.shape[1]]
    out.copy_(x)
    return out


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor | None, scale: float):
    """Unnormalised attention of q (n, H, E) over k, v (KVH, m, E) where `ok` (n, m; None: every key visible), in
    fp32: (max (n, H), sum (n, H), out (n, H, E)) with out = sum_j exp(s_j - max) v_j. Rows with no visible key:
    max -inf, zeros. Query head i uses KV head i // (H / KVH); the keys are read once per KV head."""
    n, h, e = q.shape
    kvh, m = k.shape[0], k.shape[1]
    g = h // kvh
    qg = q.float().view(n, kvh, g, e).permute(1, 0, 2, 3).reshape(kvh, n * g, e)
    s = torch.bmm(qg, _as_fp32(k, 0).transpose(1, 2)).mul_(scale).view(kvh, n, g, m)
    mx = s.amax(dim=-1) if ok is None else (s := s.masked_fill(~ok[None, :, None, :], float("-inf"))).amax(dim=-1)
    p = torch.exp(s - (mx if ok is None else torch.where(torch.isinf(mx), 0.0, mx))[..., None])
    out = torch.bmm(p.view(kvh, n * g, m), _as_fp32(v, 1)).view(kvh, n, g, e)
    return (mx.permute(1, 0, 2).reshape(n, h), p.sum(dim=-1).permute(1, 0, 2).reshape(n, h),
            out.permute(1, 0, 2, 3).reshape(n, h, e))  # fmt: skip


def merge(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact attention output (n, H, E) from partials over disjoint key sets (log-sum-exp rescaling)."""
    mx = torch.stack([p[0] for p in parts]).amax(dim=0)
    safe = torch.where(torch.isinf(mx), 0.0, mx)
    total, out = 0.0, 0.0
    for m, s, o in parts:
        w = torch.exp(m - safe)
        total = total + s * w
        out = out + o * w[..., None]
    return out / total[..., None]


def _window_start(end: int, window: int | None) -> int:
    """The first key position a decode query at position end - 1 sees."""
    return 0 if window is None else max(0, end - window)


def padded_reads(segments: list[Segment], block_size: int, window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode segments' key slots as one padded (B, longest) index and its validity mask (keys the query sees)."""
    lo = [_window_start(s.end, window) for s in segments]
    width = max(s.end - a for s, a in zip(segments, lo, strict=True))
    idx = np.zeros((len(segments), width), np.int64)
    valid = np.zeros((len(segments), width), bool)
    for i, (s, a) in enumerate(zip(segments, lo, strict=True)):
        idx[i, : s.end - a] = _slots(s.blocks, a, s.end, block_size)
        valid[i, : s.end - a] = True
    return idx, valid


def chunk_mask(ctx0: int, n: int, k0: int, m: int, window: int | None, device=None):
    """What a prefill chunk's queries (positions ctx0 .. ctx0 + n - 1) see of keys at positions k0 .. k0 + m - 1:
    PyTorch's lower-right causal bias where that is the whole rule (no window, keys from position 0, ending with
    the chunk), which its fused kernel applies without a mask tensor; else a boolean (n, m) mask."""
    if window is None and k0 == 0 and m == ctx0 + n:
        return causal_lower_right(n, m)
    return _mask(torch.arange(ctx0, ctx0 + n, device=device), torch.arange(k0, k0 + m, device=device), window)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """Attention of a prefill chunk's queries q (n, H, E) over its request's keys k, v (KVH, m, E) under `mask`
    (`chunk_mask`), in fp32 with PyTorch's fused attention (grouped-query aware): (n, H, E)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], k.float()[None], v.float()[None], attn_mask=mask, scale=scale,
        enable_gqa=True)  # fmt: skip
    return out[0].transpose(0, 1)


def batched_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float):
    """Attention of one query per request, q (B, H, E), over padded keys k, v (B, KVH, L, E) where `valid` (B, L),
    in fp32 (PyTorch's fused attention, grouped-query aware): (B, H, E)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None, :], k.float(), v.float(), attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=True)  # fmt: skip
    return out[:, :, 0, :]


class AttentionBackend(ABC):
    name: ClassVar[str]
    windowed: ClassVar[bool] = True  # honours a sliding window (Mistral); else attends every stored token

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_heads: int, scale: float,
                 window: int | None, n_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 device: torch.device):  # fmt: skip
        self.n_layers, self.n_kv_heads, self.head_dim, self.n_heads = n_layers, n_kv_heads, head_dim, n_heads
        self.scale, self.window, self.block_size, self.kv_dtype = scale, window, block_size, kv_dtype
        self.n_blocks, self.dense_device = n_blocks, device
        self.segments: list[Segment] = []

    def bind(self, segments: list[Segment]) -> None:
        """The segments of the batch the next `__call__`s (one per layer) are for."""
        self.segments = segments

    def bound(self, segments: list[Segment]) -> AttentionBackend:
        """A view of this backend bound to `segments`: the same KV store, a binding of its own (two sub-batches
        in flight at once each call their own view)."""
        view = copy.copy(self)
        view.bind(segments)
        return view

    @abstractmethod
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the batch's k, v (T, KVH, E) for `layer`, then return attention of q (T, H, E)."""

    def free(self, rid: int) -> None:  # noqa: B027 - only backends with a store of their own act
        """A request's KV is released (its blocks go back to the pool; backends with their own store drop it)."""

    def simulated_step_s(self, contexts) -> float | None:
        """A device model's time for one decode step's attention over `contexts` (simulated), where the backend
        emulates a device that has one (pim); None otherwise."""
        return None


class PagedBackend(AttentionBackend):
    """KV in paged blocks: K and V tensors (layers, KVH, blocks x block_size, E), head-major so that a run of
    contiguous slots is one contiguous (tokens, E) matrix per KV head."""

    storage: ClassVar[str] = "dense"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        where = self.dense_device if self.storage == "dense" else torch.device("cpu")
        shape = (self.n_layers, self.n_kv_heads, self.n_blocks * self.block_size, self.head_dim)
        if where.type == "cpu":  # host memory in huge pages (engine.host_memory)
            self.k, self.v = host_memory.zeros(shape, self.kv_dtype), host_memory.zeros(shape, self.kv_dtype)
        else:
            self.k = torch.zeros(shape, dtype=self.kv_dtype, device=where)
            self.v = torch.zeros(shape, dtype=self.kv_dtype, device=where)
        self._write = torch.empty(0, dtype=torch.long)
        self.kernel = None  # the fused host kernel, for decodes over KV in host memory where it builds
        group = self.n_heads // self.n_kv_heads
        if where.type == "cpu" and host_kernel.available() and host_kernel.HostAttention.fits(group, self.head_dim,
                                                                                               self.kv_dtype):
            self.kernel = host_kernel.HostAttention(torch.get_num_threads())

    def bind(self, segments: list[Segment]) -> None:
        super().bind(segments)
        slots = [_slots(s.blocks, s.ctx0, s.end, self.block_size) for s in segments]
        self._write = torch.from_numpy(np.concatenate(slots)).to(self.k.device)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(1, self._write, k.to(self.k.device, self.kv_dtype).transpose(0, 1))
        self.v[layer].index_copy_(1, self._write, v.to(self.v.device, self.kv_dtype).transpose(0, 1))

    def _bind_decodes(self, decodes: list[Segment]) -> None:
        """How the next layers attend these decode segments: with the host kernel over each request's runs of
        slots in place where the KV is in host memory and the kernel builds; else over one padded gather."""
        dev = self.k.device
        self._decode_rows = torch.tensor([s.start for s in decodes], dtype=torch.long, device=dev)
        if not decodes:
            return
        if self.kernel:
            slots = [_slots(s.blocks, _window_start(s.end, self.window), s.end, self.block_size) for s in decodes]
            self._decode_runs = host_kernel.DecodeRuns.of(slots, self.n_kv_heads, self.kernel.threads)
        else:
            idx, valid = padded_reads(decodes, self.block_size, self.window)
            self._decode_idx, self._decode_valid = torch.from_numpy(idx).to(dev), torch.from_numpy(valid).to(dev)

    def _decodes_attend(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """The rows of `out` of the decodes bound by `_bind_decodes`, from their queries in `q`."""
        rows = self._decode_rows
        if not len(rows):
            return
        if self.kernel:
            out[rows] = self.kernel.decode(q[rows].float(), self.k[layer], self.v[layer], self._decode_runs,
                                           self.scale)  # fmt: skip
        else:
            kg, vg = self._gather(layer, self._decode_idx)
            out[rows] = batched_decode(q[rows], kg, vg, self._decode_valid, self.scale)

    def _gather(self, layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at padded slots idx (B, L): (B, KVH, L, E). (`index_select` over the flattened slots: the same
        tensor as indexing with idx, 3-4x faster on the CPU for SmolLM2's 256-byte rows.)"""
        shape = (self.n_kv_heads, *idx.shape, self.head_dim)
        flat = idx.reshape(-1)
        return (torch.index_select(self.k[layer], 1, flat).view(shape).transpose(0, 1),
                torch.index_select(self.v[layer], 1, flat).view(shape).transpose(0, 1))  # fmt: skip

    def _chunk_reads(self, segments: list[Segment]) -> list[tuple[Segment, torch.Tensor, object]]:
        """(segment, the key slots it attends, `chunk_mask`) of each prefill chunk: the request's keys from the
        start of its window (or position 0) to the chunk's end."""
        dev, out = self.k.device, []
        for s in segments:
            if s.n > 1:
                lo = 0 if self.window is None else max(0, s.ctx0 - self.window + 1)
                reads = torch.from_numpy(_slots(s.blocks, lo, s.end, self.block_size)).to(dev)
                out.append((s, reads, chunk_mask(s.ctx0, s.n, lo, s.end - lo, self.window, dev)))
        return out

    def _chunks_attend(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """Each prefill chunk's rows of `out` from its queries in `q` (fused attention over its gathered keys)."""
        for s, reads, mask in self._chunks:
            keys, values = torch.index_select(self.k[layer], 1, reads), torch.index_select(self.v[layer], 1, reads)
            out[s.start : s.start + s.n] = chunk_attention(q[s.start : s.start + s.n], keys, values, mask,
                                                           self.scale)  # fmt: skip


class GpuAttention(PagedBackend):
    """Everything on the dense device, in fp32: decodes attended together (over their keys gathered into one
    padded batch, or, on a CPU, by the fused host kernel over their keys in place), each prefill chunk over its
    request's gathered keys."""

    name = "gpu"

    def bind(self, segments: list[Segment]) -> None:
        super().bind(segments)
        self._bind_decodes([s for s in segments if s.n == 1])
        self._chunks = self._chunk_reads(segments)

    def __call__(self, layer, q, k, v):
        self._store(layer, k, v)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        self._decodes_attend(layer, q, out)
        self._chunks_attend(layer, q, out)
        return out.to(q.dtype)


class CpuAttention(PagedBackend):
    """KV in host memory, attention by the host's threads (as many as PyTorch's intra-op pool has,
    `torch.set_num_threads`) with fp32 accumulation. Where the fused C kernel (`host_kernel`) builds and serves
    the storage (fp16 or fp32): decodes are attended in one call per layer over their runs of slots in place, the
    requests shared among the host threads; a decode with more keys than one piece and than one thread's share
    of the batch's gets one pass per contiguous run instead, its KV heads (or, where they do not divide evenly,
    key ranges) split over the threads, the partials merged exactly. Elsewhere the short decodes are attended
    together over one padded gather, and a longer decode is cut into pieces of contiguous keys read in place,
    each widened to fp32 in a reused buffer and reduced to a partial, the partials merged exactly. Prefill
    chunks (compute-bound) attend with PyTorch's fused attention over gathered keys. (A pool of Python threads
    over PyTorch pieces was measured slower on 2 cores: the operations already use every core and the pool adds
    its hand-offs.)"""

    name = "cpu"
    storage = "host"

    def bind(self, segments: list[Segment]) -> None:
        super().bind(segments)
        decodes = [s for s in segments if s.n == 1]
        # With the kernel, a decode gets calls of its own only where its keys exceed one thread's share of the
        # batch's (the batched call shares whole requests among the threads); else past one piece.
        limit = max(PIECE_TOKENS, sum(s.end for s in decodes) / self.kernel.threads) if self.kernel else PIECE_TOKENS
        self._bind_decodes([s for s in decodes if s.end <= limit])
        self._long = [s for s in decodes if s.end > limit]
        whole = self.n_blocks * self.block_size  # the kernel takes a whole contiguous run in one pass
        self._pieces = [self._pieces_of(s, whole if self.kernel else PIECE_TOKENS) for s in self._long]
        self._chunks = self._chunk_reads(segments)  # compute-bound: their keys are gathered for the fused kernel
        # a batch of decodes alone, each attended by the batched kernel: its output is the kernel's, row for row
        self._kernel_only = bool(self.kernel) and len(decodes) == len(segments) and not self._long

    def _pieces_of(self, s: Segment, limit: int) -> list[tuple[int, int, torch.Tensor | None]]:
        """(first slot, last slot + 1, mask or None where every key is visible) of each piece of at most `limit`
        contiguous keys of segment s."""
        lo = 0 if self.window is None else max(0, s.ctx0 - self.window + 1)
        slots = _slots(s.blocks, lo, s.end, self.block_size)
        breaks = np.flatnonzero(np.diff(slots) != 1) + 1
        q_pos = torch.arange(s.ctx0, s.end)
        pieces = []
        for run_lo, run_hi in zip(np.r_[0, breaks], np.r_[breaks, len(slots)], strict=True):
            for a in range(int(run_lo), int(run_hi), limit):
                b = min(a + limit, int(run_hi))
                ok = _mask(q_pos, torch.arange(lo + a, lo + b), self.window)
                pieces.append((int(slots[a]), int(slots[a]) + b - a, None if bool(ok.all()) else ok))
        return pieces

    def __call__(self, layer, q, k, v):
        self._store(layer, k, v)
        qh = q.to("cpu", torch.float32)
        if self._kernel_only:  # rows in segment order, one per decode: no gather or scatter of rows
            out = self.kernel.decode(qh, self.k[layer], self.v[layer], self._decode_runs, self.scale)
            return out.to(q.device, q.dtype)
        kl, vl = self.k[layer], self.v[layer]
        out = torch.empty(qh.shape, dtype=torch.float32)
        self._decodes_attend(layer, qh, out)
        for s, pieces in zip(self._long, self._pieces, strict=True):
            qs = qh[s.start : s.start + s.n]
            if self.kernel:
                parts = [p for a, b, _ in pieces for p in self.kernel.partials(qs, kl[:, a:b], vl[:, a:b], self.scale)]
            else:
                parts = [partial_attention(qs, kl[:, a:b], vl[:, a:b], ok, self.scale) for a, b, ok in pieces]
            out[s.start : s.start + s.n] = merge(parts)
        self._chunks_attend(layer, qh, out)
        return out.to(q.device, q.dtype)


class PimAttention(AttentionBackend):
    """The functional DIMM-PIM model holds the KV (FP16 in bank bytes); decode attention runs in its PUs."""

    name = "pim"
    windowed = False  # the PIM kernels attend every token a request stores

    def __init__(self, *args, model_spec=None, pim_system=None, **kw):
        """`model_spec` (the scheduler's ModelSpec) lets `simulated_step_s` time decode steps on the device
        model; `pim_system`: the system file whose DIMM-PIM this is (default `l3`)."""
        super().__init__(*args, **kw)
        from l3.devices.pim.functional import FunctionalPim
        from l3.specs.system import get_system

        spec = pim_system or get_system("l3")
        self.dram, self.pu, self.model_spec = spec.pim.dram(), spec.pim.pu, model_spec
        self.fp = FunctionalPim(self.dram, self.pu, self.n_layers, self.n_kv_heads, self.head_dim,
                                self.n_heads // self.n_kv_heads)  # fmt: skip
        self._device = None

    def simulated_step_s(self, contexts) -> float:
        """What the DIMM-PIM device model says one decode step's attention over these contexts (tokens attended,
        the new one included) takes on the whole device, all layers: the slowest rank's time (s, simulated)."""
        if not len(contexts) or self.model_spec is None:
            return 0.0
        if self._device is None:
            from l3.devices.pim.device import PimDevice

            self._device = PimDevice(self.dram, self.pu, self.model_spec)
        return float(self._device.step_attention_time(np.asarray(contexts))["max"])

    def __call__(self, layer, q, k, v):
        k16 = k.detach().to("cpu", torch.float16).numpy()
        v16 = v.detach().to("cpu", torch.float16).numpy()
        out = torch.empty(q.shape, dtype=torch.float32)
        decodes = [s for s in self.segments if s.n == 1 and s.ctx0 > 0]
        for s in self.segments:
            self.fp.append(s.rid, layer, k16[s.start : s.start + s.n], v16[s.start : s.start + s.n])
        if decodes:
            rows = [s.start for s in decodes]
            qd = q[rows].detach().to("cpu", torch.float16).numpy()
            out[rows] = torch.from_numpy(self.fp.attend([s.rid for s in decodes], layer, qd, self.scale))
        for s in self.segments:
            if s.n == 1 and s.ctx0 > 0:
                continue
            keys, vals = (torch.from_numpy(x.copy()).transpose(0, 1) for x in self.fp.read_kv(s.rid, layer))
            mask = chunk_mask(s.ctx0, s.n, 0, s.end, self.window)
            out[s.start : s.start + s.n] = chunk_attention(q[s.start : s.start + s.n].cpu(), keys, vals, mask,
                                                           self.scale)  # fmt: skip
        return out.to(q.device, q.dtype)

    def free(self, rid: int) -> None:
        self.fp.free(rid)


BACKENDS: dict[str, type[AttentionBackend]] = {b.name: b for b in (GpuAttention, CpuAttention, PimAttention)}
assert tuple(BACKENDS) == BACKEND_NAMES

