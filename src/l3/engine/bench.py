"""The engine benchmark (`l3 bench-engine`, `bench/bench_engine.py`): decode throughput against transformers
`generate` on the same model and machine, measured side by side; the cpu attention backend's read bandwidth
over a long fp16 KV against this machine's measured DRAM read bandwidth; the scheduler's predictor errors on
the measured times."""

from __future__ import annotations

import time

import numpy as np
import torch

from l3.engine.attention import CpuAttention, Segment
from l3.engine.dense import DenseForms
from l3.engine.engine import Engine
from l3.engine.loader import LoadedModel


def dram_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes/s this machine reads from DRAM: the best of `repeats` sums over an array far larger than the caches,
    with torch's threads (all cores)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def cpu_attention_bandwidth(tokens: int = 32768, kv_heads: int = 8, head_dim: int = 128, heads: int = 32,
                            repeats: int = 5) -> tuple[float, float]:  # fmt: skip
    """(effective read bytes/s, seconds) of one decode step's attention of the cpu backend over one request with
    `tokens` tokens of fp16 KV in one layer (an 8B-shaped layer by default): K and V bytes over the best time."""
    block = 16
    n_blocks = tokens // block + 1
    be = CpuAttention(1, kv_heads, head_dim, heads, head_dim**-0.5, None, n_blocks, block, torch.float16,
                      torch.device("cpu"))  # fmt: skip
    be.k.normal_()
    be.v.normal_()
    seg = Segment(0, 0, 1, tokens - 1, tuple(range(n_blocks)))
    be.bind([seg])
    q = torch.randn(1, heads, head_dim)
    k = v = torch.randn(1, kv_heads, head_dim)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        be(0, q, k, v)
        best = min(best, time.perf_counter() - t0)
    return 2 * tokens * kv_heads * head_dim * 2 / best, best


def _prompts(vocab: int, batch: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of mixed lengths (16-128 tokens)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(n)).tolist() for n in rng.integers(16, 129, batch)]


def hf_generate_tok_s(model: LoadedModel, prompts: list[list[int]], new_tokens: int) -> float:
    """New tokens/s of transformers `generate` on the prompts as one padded batch (left padding, greedy)."""
    width = max(map(len, prompts))
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    model.hf.generate(ids.to(model.hf.device), attention_mask=mask.to(model.hf.device), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad)  # fmt: skip
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def engine_tok_s(model: LoadedModel, prompts: list[list[int]], new_tokens: int, backend: str) -> tuple[float, dict]:
    """New tokens/s of the engine on the prompts as one continuous batch, and its scheduler's report."""
    engine = Engine(model, backend=backend)
    t0 = time.perf_counter()
    engine.generate(prompts, new_tokens)
    return len(prompts) * new_tokens / (time.perf_counter() - t0), engine.scheduler.report()


def pim_fidelity(model: LoadedModel, prompts: list[list[int]], new_tokens: int) -> dict:
    """The pim backend against the gpu backend (fp32 attention) on the same prompts: requests whose tokens are
    identical, the first divergence (request, token index) if any, and the largest |logit difference| over the
    tokens both produced from the same context (before any divergence)."""
    runs = {}
    for backend in ("gpu", "pim"):
        engine = Engine(model, backend=backend, kv_tokens=8192)
        engine.logits = {}
        tokens = engine.generate(prompts, new_tokens)
        runs[backend] = (tokens, [engine.logits[r] for r in sorted(engine.logits)], engine.pim_simulated_s)
    (ref, ref_logits, _), (got, got_logits, sim_s) = runs["gpu"], runs["pim"]
    worst, first = 0.0, None
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        same = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        if same < len(a) and first is None:
            first = (i, same)
        for j in range(min(same + 1, len(a))):  # the diverging token's logits still share their context
            worst = max(worst, float(np.abs(ref_logits[i][j] - got_logits[i][j]).max()))
    return {"requests": len(prompts), "identical": sum(a == b for a, b in zip(ref, got, strict=True)),
            "first_divergence": first, "max_logit_deviation": worst, "pim_simulated_s": sim_s}  # fmt: skip


def run(model: LoadedModel, batches=(1, 8, 32), new_tokens: int = 64, backends=("cpu", "gpu"),
        repeats: int = 3) -> dict:  # fmt: skip
    """Every figure of the benchmark (measured, not simulated). This machine's speed drifts by 15-20% within
    minutes, so each batch size is measured in `repeats` rounds, transformers then each backend, and each round's
    ratio compares runs a minute apart at most: tok/s are medians over the rounds, the speedup is the median of
    the rounds' ratios (with their range); predictor errors are the last round's. The attention bandwidth and
    the DRAM bandwidth alternate likewise: the fraction is the median of the rounds'. `dense_forms`: the form each
    CPU projection ran in (engine.dense, chosen by measurement on this machine)."""
    rows = []
    with torch.inference_mode():
        for b in batches:
            prompts = _prompts(model.spec.vocab_size, b)
            rounds = []
            for _ in range(repeats):
                hf = hf_generate_tok_s(model, prompts, new_tokens)
                rounds.append((hf, {be: engine_tok_s(model, prompts, new_tokens, be) for be in backends}))
            for backend in backends:
                ratios = [eng[backend][0] / hf for hf, eng in rounds]
                report = rounds[-1][1][backend][1]
                rows.append({"batch": b, "backend": backend, "rounds": repeats,
                             "engine_tok_s": float(np.median([eng[backend][0] for _, eng in rounds])),
                             "transformers_tok_s": float(np.median([hf for hf, _ in rounds])),
                             "speedup": float(np.median(ratios)), "speedup_range": (min(ratios), max(ratios)),
                             "pim_predictor_error": report.get("pim_predictor_error"),
                             "gpu_predictor_error": report.get("gpu_predictor_error")})  # fmt: skip
    pairs = [(dram_read_bandwidth(), cpu_attention_bandwidth()) for _ in range(repeats)]
    fractions = [bw / dram for dram, (bw, _) in pairs]
    mid = int(np.argsort(fractions)[len(fractions) // 2])  # the median round (the upper one of an even count)
    dram, (attn_bw, attn_s) = pairs[mid]
    return {"model": model.spec.name, "new_tokens": new_tokens, "threads": torch.get_num_threads(), "rows": rows,
            "dram_read_bw_bytes_per_s": dram, "cpu_attention_bw_bytes_per_s": attn_bw,
            "cpu_attention_step_s": attn_s, "cpu_attention_bw_fraction": fractions[mid],
            "cpu_attention_bw_fraction_range": (min(fractions), max(fractions)),
            "dense_forms": DenseForms.summary()}  # fmt: skip
