"""The cpu backend's fused decode-attention kernel (csrc/host_attention.c), built with the system's C compiler at
first use into a cache folder (`L3_CACHE_DIR`, default ~/.cache/l3) and called through ctypes, which releases the
GIL, so KV heads run on several host threads at once. `available()` is False (and the backend keeps its PyTorch
path) where there is no compiler or the CPU lacks AVX2, FMA or F16C."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from l3.cache import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "host_attention.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC"]
MAX_GROUP, MAX_HEAD_DIM = 8, 256  # the kernel's limits: query heads per KV head, elements per head
# Keys per thread below which a run is not split over the threads by key ranges (assumed, not measured: a short
# run's extra partial and thread hand-off are not worth its few microseconds of reading).
MIN_ROWS_PER_THREAD = 256
Partial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _cpu_has_flags() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags.split())


@functools.cache
def _library() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None or not _cpu_has_flags():
        return None
    code = SOURCE.read_bytes()
    digest = hashlib.sha256(code + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = cache_dir()
    lib = cache / f"host_attention-{digest}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True)
        if done.returncode != 0:
            return None
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    dll.l3_partial_f16.argtypes = [p, p, n, i, i, i, i, n, p, p, p, p]
    dll.l3_partial_f16.restype = None
    return dll


def available() -> bool:
    return _library() is not None


class HostAttention:
    """Unnormalised decode attention over runs of contiguous fp16 keys on `threads` host threads."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    @staticmethod
    def fits(group: int, head_dim: int, dtype: torch.dtype) -> bool:
        """Whether the kernel serves this shape: fp16 storage, at most MAX_GROUP query heads per KV head, head
        size a multiple of 8 up to MAX_HEAD_DIM."""
        return dtype == torch.float16 and group <= MAX_GROUP and head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0

    def partials(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> list[Partial]:
        """q (1, H, E) fp32; k, v (KVH, m, E) fp16 views with contiguous rows (stride E) -> partials (max (1, H),
        sum (1, H), out (1, H, E)) over disjoint key ranges, as engine.attention.partial_attention gives (merge them
        exactly with engine.attention.merge). The threads split the KV heads where they divide evenly; otherwise
        (3 KV heads on 2 threads) each thread takes a range of keys of every head, so none idles."""
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
        call, row_bytes = _library().l3_partial_f16, k.stride(1) * k.element_size()

        def span(heads, keys) -> None:
            mx, total, acc = out[keys]
            call(k.data_ptr() + keys[0] * row_bytes, v.data_ptr() + keys[0] * row_bytes, k.stride(0), heads[0],
                 heads[1], g, e, keys[1] - keys[0], qs.data_ptr(), mx.data_ptr(), total.data_ptr(),
                 acc.data_ptr())  # fmt: skip

        if self.pool is None or len(spans) == 1:
            for sp in spans:
                span(*sp)
        else:
            for f in [self.pool.submit(span, *sp) for sp in spans]:
                f.result()
        h = q.shape[1]
        return [(mx.reshape(1, h), total.reshape(1, h), acc.reshape(1, h, e)) for mx, total, acc in out.values()]
