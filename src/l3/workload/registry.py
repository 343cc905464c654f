"""Workload names -> loaders, and `load_workload`: pick requests, tile, and set the arrival mode."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from importlib import resources
from pathlib import Path

import numpy as np

from l3.errors import WorkloadError
from l3.workload.synthetic import (
    DEFAULT_N,
    STREAM_SAMPLE,
    SYNTHETIC,
    fixed_workload,
    poisson_arrivals,
    rng_for,
    synthetic_workload,
)
from l3.workload.traces import load_trace
from l3.workload.workload import MODES, Workload

DATA_DIR_ENV = "L3_DATA_DIR"
DATA_DIR_PARTS = ("shared", "data", "traces")

#: Trace files relative to the data dir.
TRACE_FILES: dict[str, str] = {
    "azure-code": "azure_llm_2023/AzureLLMInferenceTrace_code.csv",
    "azure-conv": "azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "mooncake-conversation": "mooncake/conversation_trace.jsonl",
    "mooncake-synthetic": "mooncake/synthetic_trace.jsonl",
    "sharegpt": "length_stats_llama2_tokenizer/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
    "arxiv": "length_stats_llama2_tokenizer/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "bwb": "length_stats_llama2_tokenizer/bwb_stats_llama2_tokenizer_filtered_v2.csv",
}
BUILTIN_FILES: dict[str, str] = {"azure-conv-sample": "data/traces/azure_conv_sample.csv"}

WORKLOAD_NAMES: dict[str, str] = {
    "default": "the openr1 synthetic set (1,000 requests, offline); needs no data files",
    "openr1": "synthetic, length-matched to OpenR1-Math-220k (short prompts, ~12.7k-token outputs)",
    "dolphin-r1": "synthetic, length-matched to Dolphin-r1 (~3.9k-token outputs)",
    "openthoughts": "synthetic, length-matched to OpenThoughts-114k-math (~6.4k-token outputs)",
    "dolphin-short": "synthetic Dolphin-r1 with every length divided by 10",
    "azure-conv-sample": "first 2,000 requests of the Azure 2023 conversation trace (built in)",
    "azure-code": "Azure LLM inference trace 2023, code (8,819 requests, ~57 min)",
    "azure-conv": "Azure LLM inference trace 2023, conversation (19,366 requests, ~58 min)",
    "mooncake-conversation": "Mooncake/Kimi conversation trace (12,031 requests, long prompts, prefix ids)",
    "mooncake-synthetic": "Mooncake synthetic trace (3,993 requests, Poisson arrivals, prefix ids)",
    "sharegpt": "ShareGPT prompt/output lengths, Llama-2 tokenizer (30,731 requests, no timestamps)",
    "arxiv": "arXiv summarization lengths, Llama-2 tokenizer (28,257 requests, no timestamps)",
    "bwb": "BWB document-translation lengths, Llama-2 tokenizer (33,768 requests, long outputs)",
    "fixed:P:O": "N identical requests of P prompt and O output tokens (context sweeps)",
}


def find_data_dir(data_dir: Path | None = None) -> Path:
    """The folder holding the named trace files: argument, else $L3_DATA_DIR, else shared/data/traces found
    upward from the current directory or from this package."""
    if data_dir is None and os.environ.get(DATA_DIR_ENV):
        data_dir = Path(os.environ[DATA_DIR_ENV])
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise WorkloadError(f"workload data dir {data_dir} is not a directory")
        return Path(data_dir)
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder.joinpath(*DATA_DIR_PARTS)
            if candidate.is_dir():
                return candidate
    raise WorkloadError(
        f"trace data dir not found: looked for {'/'.join(DATA_DIR_PARTS)} above {starts[0]} and {starts[1]}; "
        f"set {DATA_DIR_ENV}=/path/to/traces or pass data_dir"
    )


def load_workload(
    name_or_path: str,
    n_requests: int | None = None,
    seed: int = 0,
    mode: str | None = None,
    rate_scale: float = 1.0,
    arrival_rate: float | None = None,
    data_dir: Path | None = None,
    strict: bool = False,
) -> Workload:
    """Load a named workload or a trace file and shape it for a run.

    A trace's impossible rows are refused and counted (`Workload.rows_refused`); `strict` makes any an error.

    n_requests: first N requests in arrival order (length-only sets: a seeded sample in file order); more than
    the file holds tiles it (see `tile`); None = every row (synthetic sets: 1,000).
    mode: "offline" (all arrivals 0) or "online"; default online for timestamped traces or when arrival_rate
    is given, else offline. arrival_rate (req/s) replaces arrivals with a seeded Poisson process.
    rate_scale: multiplies the request rate (arrival times are divided by it); online mode only.
    """
    _check_options(n_requests, seed, mode, rate_scale, arrival_rate)
    name = "openr1" if name_or_path == "default" else name_or_path
    if name in SYNTHETIC:
        base = synthetic_workload(name, n_requests or DEFAULT_N, seed)
    elif name.startswith("fixed:"):
        base = fixed_workload(name, n_requests or DEFAULT_N)
    else:
        base = load_trace(_resolve_file(name, data_dir), name=name)
        if strict and base.rows_refused:
            reasons = ", ".join(f"{k}: {v}" for k, v in base.refused_reasons.items())
            raise WorkloadError(f"{name}: {base.rows_refused} rows refused as impossible ({reasons}); strict "
                                "mode makes any refused row an error")  # fmt: skip
    if n_requests is not None and name not in SYNTHETIC and not name.startswith("fixed:"):
        base = _select(base, n_requests, seed)
    return _set_arrivals(base, mode, rate_scale, arrival_rate, seed)


def _check_options(
    n_requests: int | None, seed: int, mode: str | None, rate_scale: float, arrival_rate: float | None
) -> None:
    if n_requests is not None and (not isinstance(n_requests, numbers.Integral) or n_requests < 1):
        raise WorkloadError(f"--requests must be a positive integer, got {n_requests!r}")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise WorkloadError(f"--seed must be a non-negative integer, got {seed!r}")
    if mode is not None and mode not in MODES:
        raise WorkloadError(f"--mode must be one of {MODES}, got {mode!r}")
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise WorkloadError(f"--rate-scale must be a positive number, got {rate_scale!r}")
    if arrival_rate is not None and not (math.isfinite(arrival_rate) and arrival_rate > 0):
        raise WorkloadError(f"--arrival-rate must be a positive number of requests/s, got {arrival_rate!r}")
    if mode == "offline" and (arrival_rate is not None or rate_scale != 1.0):
        raise WorkloadError(
            "arrival_rate and rate_scale apply only to online mode (offline: all arrive at 0)"
        )


def _resolve_file(name: str, data_dir: Path | None) -> Path:
    if name in BUILTIN_FILES:
        return Path(str(resources.files("l3").joinpath(BUILTIN_FILES[name])))
    if name in TRACE_FILES:
        path = find_data_dir(data_dir) / TRACE_FILES[name]
        if not path.is_file():
            raise WorkloadError(f"workload {name}: trace file {path} not found")
        return path
    path = Path(name)
    if not path.is_file():
        raise WorkloadError(
            f"unknown workload {name!r}: not a file and not one of {', '.join(WORKLOAD_NAMES)}"
        )
    return path


def _select(w: Workload, n: int, seed: int) -> Workload:
    """First n requests (seeded sample in file order for a set without timestamps); tile when n > len(w)."""
    if n > len(w):
        return tile(w, n)
    if w.mode == "offline":
        idx = np.sort(rng_for(seed, STREAM_SAMPLE).choice(len(w), size=n, replace=False))
        how = f"seeded sample (seed {seed}) of {n} of {len(w)} requests"
    else:
        idx = np.arange(n)
        how = f"first {n} of {len(w)} requests"
    return _subset(w, idx, how)


def tile(w: Workload, n: int) -> Workload:
    """Repeat w until it has n requests. Copy k is shifted in time by k * (span + mean gap), where span is
    last - first arrival and mean gap = span / (len - 1), so the rate is kept and arrivals stay ordered.
    Prefix block ids of copy k are offset by k * (max id + 1): copies share no prefix KV with each other."""
    copies = -(-n // len(w))
    k = np.repeat(np.arange(copies), len(w))[:n]
    idx = np.tile(np.arange(len(w)), copies)[:n]
    span = float(w.arrival_s[-1] - w.arrival_s[0])
    period = span + (span / (len(w) - 1) if len(w) > 1 else 0.0)
    blocks = None
    if w.prefix_blocks is not None:
        stride = 1 + max((int(b.max()) for b in w.prefix_blocks if b.size), default=0)
        blocks = [w.prefix_blocks[i] + j * stride for i, j in zip(idx, k, strict=True)]
    how = f"tiled {copies}x to {n} requests (copy period {period:.3f} s)"
    return _subset(w, idx, how, arrival_s=w.arrival_s[idx] + k * period, prefix_blocks=blocks)


def _subset(
    w: Workload,
    idx: np.ndarray,
    how: str,
    arrival_s: np.ndarray | None = None,
    prefix_blocks: list[np.ndarray] | None = None,
) -> Workload:
    """Rows idx of w (arrival_s / prefix_blocks override the plain selection), noting `how` in the source."""
    if prefix_blocks is None and w.prefix_blocks is not None:
        prefix_blocks = [w.prefix_blocks[i] for i in idx]
    return dataclasses.replace(
        w,
        arrival_s=w.arrival_s[idx] if arrival_s is None else arrival_s,
        prompt_len=w.prompt_len[idx],
        output_len=w.output_len[idx],
        prefix_blocks=prefix_blocks,
        source=f"{w.source}; {how}",
    )


def _set_arrivals(
    w: Workload, mode: str | None, rate_scale: float, arrival_rate: float | None, seed: int
) -> Workload:
    timestamped = w.mode == "online"
    mode = mode or ("online" if timestamped or arrival_rate is not None else "offline")
    if mode == "offline":
        if not timestamped:
            return w
        return dataclasses.replace(
            w, arrival_s=np.zeros(len(w)), mode="offline", source=f"{w.source}; offline"
        )
    if arrival_rate is not None:
        arrivals = poisson_arrivals(len(w), arrival_rate, seed)
        how = f"Poisson arrivals {arrival_rate:g} req/s (seed {seed})"
    elif timestamped:
        arrivals, how = w.arrival_s, "trace arrivals"
    else:
        raise WorkloadError(
            f"workload {w.name} has no timestamps: online mode needs arrival_rate (requests/s)"
        )
    if rate_scale != 1.0:
        how += f" x rate_scale {rate_scale:g}"
    return dataclasses.replace(
        w, arrival_s=arrivals / rate_scale, mode="online", source=f"{w.source}; online, {how}"
    )
