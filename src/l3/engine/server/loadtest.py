"""`l3 loadtest`: replay a workload's prompt and output lengths against an OpenAI-compatible server on this
machine, N requests in flight at a time, and measure throughput, TTFT and TBT as the client sees them.

Each request is a streamed /v1/completions call whose prompt is that many random token ids (seeded) and whose
output is exactly that many tokens (`max_tokens`, `ignore_eos`, greedy). A request longer than the server's
context (`max_model_len` of /v1/models) has its prompt and output scaled down together to fit; the summary
counts them. TTFT: from sending the request to its first streamed chunk; TBT: between consecutive chunks (the
server streams one chunk per token). Bounded: at most MAX_REQUESTS requests, `max_seconds` of wall time (what
has not finished then is cancelled and counted), localhost only."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np

from l3.errors import EngineError
from l3.workload import load_workload

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 10_000
MAX_CONCURRENCY = 256


@dataclass
class Sent:
    """One request's lengths and what the client measured."""

    prompt: int
    output: int
    tokens: int = 0  # output tokens the server reported
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    latency_s: float | None = None
    error: str | None = None


def check_url(url: str) -> str:
    """The base URL without a trailing slash; an EngineError unless it is http(s) on this machine."""
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise EngineError(f"--url {url!r}: expected a server on this machine, e.g. http://127.0.0.1:8000 (the load "
                          f"test only targets {', '.join(LOCAL_HOSTS)})")  # fmt: skip
    return url.rstrip("/")


def plan_requests(workload: str, n: int, context: int, seed: int = 0) -> tuple[list[tuple[int, int]], int]:
    """The first `n` requests' (prompt, output) lengths, each scaled to fit `context` tokens where needed;
    returns them and how many were scaled."""
    if not 1 <= n <= MAX_REQUESTS:
        raise EngineError(f"--requests {n}: expected 1 to {MAX_REQUESTS}")
    w = load_workload(workload, n_requests=n, seed=seed, mode="offline")
    out, scaled = [], 0
    for p, o in zip(w.prompt_len.tolist(), w.output_len.tolist(), strict=True):
        if p + o > context:
            f = context / (p + o)
            p, o = max(int(p * f), 1), max(int(o * f), 1)
            p = min(p, context - o)
            scaled += 1
        out.append((p, o))
    return out, scaled


async def _one(client: httpx.AsyncClient, url: str, model: str, ids: list[int], sent: Sent) -> None:
    body = {"model": model, "prompt": ids, "max_tokens": sent.output, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                sent.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices"):
                    if sent.ttft_s is None:
                        sent.ttft_s = now - start
                    else:
                        sent.gaps_s.append(now - last)
                    last = now
                if chunk.get("usage"):
                    sent.tokens = int(chunk["usage"]["completion_tokens"])
        sent.latency_s = time.perf_counter() - start
    except httpx.HTTPError as exc:
        sent.error = f"{type(exc).__name__}: {exc}"


async def _run(url: str, model: str, vocab: int, lengths: list[tuple[int, int]], concurrency: int,
               max_seconds: float, seed: int, on_done: Callable[[], None]) -> tuple[list[Sent], float]:  # fmt: skip
    rng = np.random.default_rng(seed)
    sents = [Sent(p, o) for p, o in lengths]
    prompts = [rng.integers(0, vocab, p).tolist() for p, _ in lengths]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds), limits=limits) as client:

        async def send(i: int) -> None:
            async with gate:
                await _one(client, url, model, prompts[i], sents[i])
            on_done()

        start = time.perf_counter()
        tasks = [asyncio.create_task(send(i)) for i in range(len(sents))]
        _, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return sents, time.perf_counter() - start


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def run_loadtest(url: str, workload: str, concurrency: int, n_requests: int, max_seconds: float = 600.0,
                 seed: int = 0, on_start: Callable[[int], None] = lambda n: None,
                 on_done: Callable[[], None] = lambda: None) -> dict:  # fmt: skip
    """Replay `workload` against the server at `url`; returns the summary (throughput, TTFT/TBT percentiles,
    counts). `on_start(n)` and `on_done()` drive a progress display."""
    url = check_url(url)
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise EngineError(f"--concurrency {concurrency}: expected 1 to {MAX_CONCURRENCY}")
    if not max_seconds > 0:
        raise EngineError(f"--max-seconds {max_seconds}: expected a positive number")
    try:
        served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        raise EngineError(f"--url {url}: no OpenAI-compatible server answers GET /v1/models there") from None
    context = int(served.get("max_model_len") or 2048)
    lengths, scaled = plan_requests(workload, n_requests, context, seed)
    on_start(len(lengths))
    sents, wall = asyncio.run(_run(url, served["id"], int(served.get("vocab_size") or 1000), lengths, concurrency,
                                   max_seconds, seed, on_done))  # fmt: skip
    done = [s for s in sents if s.latency_s is not None and s.error is None]
    errors = [s.error for s in sents if s.error is not None]
    tokens = sum(s.tokens for s in done)
    return {
        "url": url, "model": served["id"], "workload": workload, "concurrency": concurrency,
        "requests": len(sents), "completed": len(done), "failed": len(errors),
        "unfinished": len(sents) - len(done) - len(errors), "first_error": errors[0] if errors else None,
        "scaled_to_context": scaled, "context": context, "wall_s": wall,
        "prompt_tokens": sum(s.prompt for s in done), "output_tokens": tokens,
        "output_tokens_expected": sum(s.output for s in done),
        "throughput_tok_s": tokens / wall if wall > 0 else None, "requests_per_s": len(done) / wall,
        "ttft_s": _percentiles([s.ttft_s for s in done]),
        "tbt_s": _percentiles([g for s in done for g in s.gaps_s]),
        "latency_s": _percentiles([s.latency_s for s in done]),
    }  # fmt: skip
