"""The link between the dense device and the host, as the interleaved forward (`DecoderRunner.forward_pair`) uses
it: a sub-batch's Q, K, V go to the host for attention and its output comes back, and the dense device's work is
timed per piece.

On CUDA nothing waits that need not: copies to the host go into pinned buffers behind the work already queued
and are awaited by an event of their own, so the host can attend one sub-batch while the GPU still runs the
other's layers; the output goes back from a pinned buffer without blocking the host; dense work is timed by CUDA
events, read once the iteration is done. On a CPU the tensors already are where attention runs, so each step is
the identity and dense work is timed by the host's clock (nothing overlaps there: both sides share the cores)."""

from __future__ import annotations

import time

import torch

Tensors = tuple[torch.Tensor, ...]


class HostLink:
    """The CPU as the dense device: tensors stay put, times are the host clock's."""

    def to_host(self, tensors: Tensors) -> object:
        """Start moving `tensors` to the host; `wait` on the result gives them there."""
        return tensors

    def wait(self, pending) -> Tensors:
        return pending

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (on the host) on the dense device, without blocking the host."""
        return t

    def mark(self):
        """A point in the dense device's stream of work (`elapsed` between two marks)."""
        return time.perf_counter()

    def finish(self) -> None:
        """Wait until the dense device has done all its queued work (before reading `elapsed`)."""

    def elapsed(self, a, b) -> float:
        """Seconds of dense-device time between marks a and b."""
        return b - a


class CudaLink(HostLink):
    """A CUDA dense device: copies through pinned buffers on the current stream, events for waiting and timing."""

    def __init__(self, device: torch.device):
        self.device = device

    def to_host(self, tensors: Tensors) -> object:
        bufs = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
        for b, t in zip(bufs, tensors, strict=True):
            b.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return bufs, done

    def wait(self, pending) -> Tensors:
        bufs, done = pending
        done.synchronize()
        return bufs

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        # PyTorch's pinned-memory allocator keeps the buffer until the copy that reads it has run
        return t.pin_memory().to(self.device, non_blocking=True)

    def mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3


def link_for(device: torch.device) -> HostLink:
    """The link for a dense device: CUDA's, or the host's own."""
    return CudaLink(device) if device.type == "cuda" else HostLink()
