"""Host memory for the KV cache of the `cpu` backend: one allocation per tensor, advised to the kernel as huge
pages (2 MiB on x86-64) before it is first touched, so streaming a long request's keys walks 512x fewer page
table entries. Where the advice is not available (not Linux, transparent huge pages off) the tensor is the same,
in ordinary pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 << 20  # bytes: x86-64 and arm64 (4 KiB base pages)


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def huge_span(address: int, nbytes: int) -> tuple[int, int]:
    """(start, length) of the whole huge pages inside [address, address + nbytes); length 0 where there are none."""
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    return start, max(0, (address + nbytes - start) // HUGE_PAGE * HUGE_PAGE)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor whose whole huge pages are advised as such before the zeros touch them."""
    t = torch.empty(shape, dtype=dtype)
    start, length = huge_span(t.data_ptr(), t.numel() * t.element_size())
    madvise = _madvise()
    if madvise is not None and length:
        madvise(start, length, MADV_HUGEPAGE)  # advice only: a refusal leaves ordinary pages
    return t.zero_()
