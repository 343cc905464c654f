"""The engine's host kernels (csrc/): fused decode attention over KV in host memory (host_attention.c), the
dense layers' one-row projections (host_gemv.c) and few-row projections against weights in GGUF block formats
(host_packed.c), built with the system's C compiler at first use into a cache folder (`L3_CACHE_DIR`, default
~/.cache/l3) and called through ctypes, which releases the GIL, so requests, KV heads or weight rows run on
several host threads at once. `available()` is False (and the engine keeps its PyTorch paths) where there is no
compiler or the CPU lacks AVX2, FMA or F16C; `packed_available()` also needs AVX-512F."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from l3.cache import cache_dir

if TYPE_CHECKING:
    from l3.engine.packed import PackedWeight

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "host_attention.c", CSRC / "host_gemv.c", CSRC / "host_packed.c"]  # one library
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC"]
# Optional flags, tried in this order until the compiler takes them: OpenMP (the packed kernel's threads) and
# instruction choice and scheduling tuned for the CPU that builds the library (tuning never adds an instruction
# the baseline flags do not allow; the packed kernel at 32 rows ran 14% faster on the Xeon of docs/benchmarks.md)
OPTIONAL_FLAGS = (["-fopenmp", "-mtune=native"], ["-fopenmp"], [])
MAX_GROUP, MAX_HEAD_DIM = 8, 256  # the kernel's limits: query heads per KV head, elements per head
# Keys per thread below which a run is not split over the threads by key ranges (assumed, not measured: a short
# run's extra partial and thread hand-off are not worth its few microseconds of reading).
MIN_ROWS_PER_THREAD = 256
# Weight rows per thread below which a one-row projection is not split further (assumed, like the above: a
# thread hand-off costs tens of microseconds, about what 64 rows of a 4K-wide fp32 weight take to stream).
GEMV_MIN_ROWS_PER_THREAD = 64
# Bytes of packed weight per thread below which a packed projection stays on one thread (measured on the Xeon of
# docs/benchmarks.md, SmolLM2's 211 projections at one row: 20.0-20.5 ms with 1 MB, where only the LM head split;
# 12.9-13.0 ms with 64 KB and 12.5-12.8 ms with 16 KB, where every projection splits over the OpenMP threads).
PACKED_MIN_BYTES_PER_THREAD = 1 << 14
PACKED_MAX_ROWS = 64  # rows of x per packed call (a decode batch; each weight row is read once per 8 of them)
Partial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(flags.split()[1:])


def _cpu_has_flags() -> bool:
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


@functools.cache
def _library() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or not _cpu_has_flags():
        return None
    code = b"".join(f.read_bytes() for f in [*SOURCES, CSRC / "simd.h"])
    digest = hashlib.sha256(code + repr((FLAGS, OPTIONAL_FLAGS)).encode()).hexdigest()[:16]
    cache = cache_dir()
    lib = cache / f"host_kernels-{digest}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        for extra in OPTIONAL_FLAGS:
            done = subprocess.run([cc, *FLAGS, *extra, "-o", str(tmp), *map(str, SOURCES), "-lm"],
                                  capture_output=True)  # fmt: skip
            if done.returncode == 0:
                break
        else:
            return None
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    dll.l3_partial.argtypes = [p, p, i, n, i, i, i, i, n, p, p, p, p]
    dll.l3_partial.restype = None
    dll.l3_decode.argtypes = [p, p, i, n, i, i, i, p, p, i, i, i, i, p, p]
    dll.l3_decode.restype = None
    dll.l3_decode_spans.argtypes = [p, p, i, n, i, i, i, p, p, p, i, p, p, i]
    dll.l3_decode_spans.restype = None
    dll.l3_gemv_f32.argtypes = [p, n, p, p, n, n]
    dll.l3_gemv_f32.restype = None
    dll.l3_gemv_packed.argtypes = [p, p, i, n, p, i, p, n, i]
    dll.l3_gemv_packed.restype = None
    return dll


def available() -> bool:
    return _library() is not None


def packed_available() -> bool:
    """Whether the packed-weight kernel runs here (the library, and a CPU with AVX-512F)."""
    return "avx512f" in _cpu_flags() and available()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers)


def side_by_side(fn, spans, threads: int) -> None:
    """fn(*span) for every span, on up to `threads` host threads: the calling thread takes the first, the
    others go to one shared pool of threads - 1 workers (kernel calls release the GIL)."""
    if threads <= 1 or len(spans) <= 1:
        for sp in spans:
            fn(*sp)
        return
    others = [_pool(threads - 1).submit(fn, *sp) for sp in spans[1:]]
    fn(*spans[0])
    for f in others:
        f.result()


def gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """w @ x for a weight w (N, K) and one row x (K,), both fp32 on the CPU, its rows split over PyTorch's host
    threads in multiples of 8; None where the kernel does not serve them (another dtype or device, a weight
    without contiguous rows, no kernel here)."""
    if not (w.dtype == x.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() and available()):
        return None
    x = x.contiguous()
    n, k = w.shape
    y = torch.empty(n, dtype=torch.float32)
    call, args = _library().l3_gemv_f32, (w.data_ptr(), k, x.data_ptr(), y.data_ptr())
    t = max(1, min(torch.get_num_threads(), n // GEMV_MIN_ROWS_PER_THREAD))
    cuts = [n * i // t // 8 * 8 for i in range(t)] + [n]
    side_by_side(lambda a, b: call(*args, a, b), list(itertools.pairwise(cuts)), t)
    return y


def gemv_packed(w: PackedWeight, x: torch.Tensor) -> torch.Tensor | None:
    """x W^T for W (N, K) from GGUF blocks in the kernel's layout (`engine.packed.PackedWeight`: codes and fp32
    scales) and x (rows, K) fp32 on the CPU, rows <= PACKED_MAX_ROWS: (rows, N) fp32, W's rows split over
    PyTorch's threads (its OpenMP runtime) where each gets PACKED_MIN_BYTES_PER_THREAD; None where the kernel
    does not serve it."""
    rows = x.shape[0]
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and 1 <= rows <= PACKED_MAX_ROWS
            and x.shape[1] == w.k and packed_available()):  # fmt: skip
        return None
    x = x.contiguous()
    n = len(w.codes)
    codes, scales, nbytes = w.addresses
    y = torch.empty(rows, n, dtype=torch.float32)
    t = max(1, min(torch.get_num_threads(), nbytes // PACKED_MIN_BYTES_PER_THREAD))
    _library().l3_gemv_packed(codes, scales, w.code, w.k, x.data_ptr(), rows, y.data_ptr(), n, t)
    return y


def runs_of(slots: np.ndarray) -> np.ndarray:
    """(first slot, length) of each run of consecutive slots in `slots` (a request's key slots in token order)."""
    if not len(slots):
        return np.zeros((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    lo, hi = np.r_[0, breaks], np.r_[breaks, len(slots)]
    return np.stack([slots[lo], hi - lo], axis=1).astype(np.int64)


@dataclass(frozen=True)
class DecodeRuns:
    """Where a batch's decode requests keep their keys, and how the host threads share them: request b's runs
    (first slot, length) are runs[run_lo[b] : run_lo[b + 1]]; `spans` (first request, end request, first KV
    head, end KV head) is one thread's share."""

    runs: np.ndarray  # int64 (R, 2)
    run_lo: np.ndarray  # int64 (B + 1,)
    spans: tuple[tuple[int, int, int, int], ...]

    @functools.cached_property
    def span_array(self) -> np.ndarray:
        """`spans` as int64 (S, 4), as the library reads them."""
        return np.asarray(self.spans, np.int64).reshape(-1, 4)

    @classmethod
    def of(cls, slots: list[np.ndarray], kv_heads: int, threads: int) -> DecodeRuns:
        """From each request's key slots: requests split over the threads in contiguous groups of about equal
        keys where there are at least as many requests as threads; else each request's KV heads split; all on one
        thread where the threads would get fewer than MIN_ROWS_PER_THREAD keys each."""
        per = [runs_of(s) for s in slots]
        runs = np.concatenate(per) if per else np.zeros((0, 2), np.int64)
        run_lo = np.r_[0, np.cumsum([len(r) for r in per])].astype(np.int64)
        b = len(slots)
        keys = np.cumsum([len(s) for s in slots])
        if b == 0 or keys[-1] < threads * MIN_ROWS_PER_THREAD:  # too few keys to be worth a hand-off
            return cls(runs, run_lo, ((0, b, 0, kv_heads),) if b else ())
        if b >= threads:
            cuts = np.searchsorted(keys, keys[-1] * np.arange(1, threads) / threads, side="right")
            bounds = np.unique(np.r_[0, cuts, b])
            spans = tuple((int(x), int(y), 0, kv_heads) for x, y in itertools.pairwise(bounds) if y > x)
        else:
            heads = min(threads, kv_heads)
            cuts = [kv_heads * i // heads for i in range(heads + 1)]
            spans = tuple((r, r + 1, h0, h1) for r in range(b) for h0, h1 in itertools.pairwise(cuts))
        return cls(runs, run_lo, spans)


class HostAttention:
    """Decode attention over keys and values in host memory (fp16 or fp32) on `threads` host threads: whole
    batches of requests over their runs of contiguous slots (`decode`; the spans shared among PyTorch's OpenMP
    threads inside the library, with no Python thread hand-off), or one request's run as partials (`partials`)."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)

    @staticmethod
    def fits(group: int, head_dim: int, dtype: torch.dtype) -> bool:
        """Whether the kernel serves this shape: fp16 or fp32 storage, at most MAX_GROUP query heads per KV head,
        head size a multiple of 8 up to MAX_HEAD_DIM."""
        return (dtype in (torch.float16, torch.float32) and group <= MAX_GROUP and head_dim <= MAX_HEAD_DIM
                and head_dim % 8 == 0)  # fmt: skip

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: DecodeRuns,
               scale: float) -> torch.Tensor:  # fmt: skip
        """Attention of one query row per request, q (B, H, E) fp32, over its runs of k, v (KVH, slots, E) (one
        layer's storage, rows contiguous) as `where` says: (B, H, E) fp32, exact up to fp32 rounding (no mask:
        a request attends every key of its runs)."""
        kvh, _, e = k.shape
        b, h = q.shape[:2]
        qs = (q * scale).contiguous()
        out = torch.empty(b, h, e)
        spans = where.span_array
        _library().l3_decode_spans(k.data_ptr(), v.data_ptr(), int(k.dtype == torch.float32), k.stride(0), kvh,
                                   h // kvh, e, where.runs.ctypes.data, where.run_lo.ctypes.data, spans.ctypes.data,
                                   len(spans), qs.data_ptr(), out.data_ptr(), self.threads)  # fmt: skip
        return out

    def partials(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> list[Partial]:
        """q (1, H, E) fp32; k, v (KVH, m, E) fp16 or fp32 views with contiguous rows (stride E) -> partials (max
        (1, H), sum (1, H), out (1, H, E)) over disjoint key ranges, as engine.attention.partial_attention gives
        (merge them exactly with engine.attention.merge). The threads split the KV heads where they divide
        evenly; otherwise (3 KV heads on 2 threads) each thread takes a range of keys of every head, so none
        idles."""
        kvh, m = k.shape[:2]
        t = self.threads
        if kvh % t == 0 or m < t * MIN_ROWS_PER_THREAD:
            cuts = [kvh * i // t for i in range(t + 1)]
            return self._run(q, k, v, scale, [((a, b), (0, m)) for a, b in itertools.pairwise(cuts) if b > a])
        cuts = [m * i // t for i in range(t + 1)]
        return self._run(q, k, v, scale, [((0, kvh), (a, b)) for a, b in itertools.pairwise(cuts)])

    def _run(self, q, k, v, scale, spans) -> list[Partial]:
        """One kernel call per span ((first head, end head), (first key, end key)), side by side on the threads:
        one partial per key range, the head ranges of a key range filling its rows."""
        kvh, _, e = k.shape
        g = q.shape[1] // kvh
        qs = (q[0] * scale).contiguous()
        rows = sorted({r for _, r in spans})
        out = {r: (torch.empty(kvh, g), torch.empty(kvh, g), torch.empty(kvh, g, e)) for r in rows}
        call, row_bytes = _library().l3_partial, k.stride(1) * k.element_size()
        f32 = int(k.dtype == torch.float32)

        def span(heads, keys) -> None:
            mx, total, acc = out[keys]
            call(k.data_ptr() + keys[0] * row_bytes, v.data_ptr() + keys[0] * row_bytes, f32, k.stride(0),
                 heads[0], heads[1], g, e, keys[1] - keys[0], qs.data_ptr(), mx.data_ptr(), total.data_ptr(),
                 acc.data_ptr())  # fmt: skip

        side_by_side(span, spans, self.threads)
        h = q.shape[1]
        return [(mx.reshape(1, h), total.reshape(1, h), acc.reshape(1, h, e)) for mx, total, acc in out.values()]
