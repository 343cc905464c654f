"""The Workload type: a list of requests (arrival time, prompt and output lengths) plus where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from l3.errors import WorkloadError

MODES = ("offline", "online")


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order; all arrays are read-only and of equal length.

    arrival_s: float64 seconds, non-decreasing, first >= 0 (all 0 in offline mode).
    prompt_len, output_len: int64 tokens, >= 1.
    prefix_blocks: per request, the ids of its 512-token prompt blocks (equal ids = shareable prefix KV),
    or None when the source has no prefix information.
    rows_refused / refused_reasons: input rows the loader refused as impossible, by reason (they sum to
    rows_refused); a subset keeps them (they describe the file it came from).
    """

    name: str
    arrival_s: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    mode: str
    source: str
    prefix_blocks: list[np.ndarray] | None = None
    rows_refused: int = 0
    refused_reasons: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        for key, dtype in (("arrival_s", np.float64), ("prompt_len", np.int64), ("output_len", np.int64)):
            arr = np.array(getattr(self, key), dtype=dtype)  # a private copy, then frozen
            if arr.ndim != 1 or len(arr) != n:
                raise WorkloadError(f"workload {self.name}: {key} must be 1-D with {n} entries")
            arr.flags.writeable = False
            object.__setattr__(self, key, arr)
        if self.mode not in MODES:
            raise WorkloadError(f"workload {self.name}: mode must be one of {MODES}, got {self.mode!r}")
        if n == 0:
            raise WorkloadError(f"workload {self.name}: no requests")
        a = self.arrival_s
        if not np.all(np.isfinite(a)) or a[0] < 0 or np.any(np.diff(a) < 0):
            raise WorkloadError(f"workload {self.name}: arrival_s must be finite, >= 0 and non-decreasing")
        if self.prompt_len.min() < 1 or self.output_len.min() < 1:
            raise WorkloadError(f"workload {self.name}: prompt_len and output_len must be >= 1 token")
        if self.mode == "offline" and np.any(a != 0):
            raise WorkloadError(f"workload {self.name}: offline mode needs all arrivals at 0")
        if self.prefix_blocks is not None:
            if len(self.prefix_blocks) != n:
                raise WorkloadError(f"workload {self.name}: prefix_blocks must have {n} entries")
            for blocks in self.prefix_blocks:
                blocks.flags.writeable = False

    def __len__(self) -> int:
        return len(self.arrival_s)

    def subset(self, idx: np.ndarray, name: str, source: str) -> Workload:
        """The requests at ascending indices `idx`, with their arrival times and prefix blocks."""
        idx = np.asarray(idx, np.int64)
        blocks = None if self.prefix_blocks is None else [self.prefix_blocks[i] for i in idx]
        return Workload(name=name, arrival_s=self.arrival_s[idx], prompt_len=self.prompt_len[idx],
                        output_len=self.output_len[idx], mode=self.mode, source=source, prefix_blocks=blocks,
                        rows_refused=self.rows_refused, refused_reasons=dict(self.refused_reasons))  # fmt: skip

    def describe(self) -> dict:
        """Summary for reports: plain Python numbers only (JSON-serialisable)."""

        def stats(x: np.ndarray) -> dict[str, float]:
            return {
                "mean": float(x.mean()),
                "std": float(x.std()),
                "p50": float(np.percentile(x, 50)),
                "p99": float(np.percentile(x, 99)),
                "max": int(x.max()),
            }

        span = float(self.arrival_s[-1] - self.arrival_s[0])
        return {
            "name": self.name,
            "mode": self.mode,
            "n": len(self),
            "source": self.source,
            "prompt_len": stats(self.prompt_len),
            "output_len": stats(self.output_len),
            "arrival_span_s": span,
            "mean_rate_per_s": (len(self) - 1) / span if span > 0 else None,
            "has_prefix_blocks": self.prefix_blocks is not None,
            "rows_refused": self.rows_refused,
            "refused_reasons": dict(self.refused_reasons),
        }


def from_rows(
    name: str,
    arrival_s: np.ndarray,
    prompt_len: np.ndarray,
    output_len: np.ndarray,
    *,
    mode: str,
    source: str,
    prefix_blocks: list[np.ndarray] | None = None,
) -> Workload:
    """Build a Workload from parsed rows: refuse impossible rows (counted by reason) and sort by arrival.

    A row is impossible when prompt_len < 1, output_len < 1 or arrival_s < 0; a row with several faults counts
    once, under the first of these. Rows whose timestamps go backwards are kept and moved into arrival order
    (stable sort, so equal timestamps keep file order).
    """
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    output_len = np.asarray(output_len, dtype=np.int64)
    keep = np.ones(len(arrival_s), dtype=bool)
    reasons: dict[str, int] = {}
    for reason, bad in (
        ("prompt_len < 1", prompt_len < 1),
        ("output_len < 1", output_len < 1),
        ("arrival_s < 0", arrival_s < 0),
    ):
        count = int(np.count_nonzero(bad & keep))
        if count:
            reasons[reason] = count
            keep &= ~bad
    if not keep.any():
        raise WorkloadError(f"{name}: all {len(keep)} rows are impossible ({reasons})")
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(arrival_s[idx], kind="stable")]
    return Workload(
        name=name,
        arrival_s=arrival_s[idx],
        prompt_len=prompt_len[idx],
        output_len=output_len[idx],
        mode=mode,
        source=source,
        prefix_blocks=None if prefix_blocks is None else [prefix_blocks[i] for i in idx],
        rows_refused=int(len(keep) - len(idx)),
        refused_reasons=reasons,
    )
