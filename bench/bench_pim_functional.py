"""Benchmark the DIMM-PIM functional model: one layer of decode attention over a 32K-token context.

Prints, for GQA-8 (64 query heads) and MHA-8 (8 query heads), 8 KV heads of dim 128 on one DDR4-3200 rank:
N_hc, append time, attend time (best of a few runs) and the relative error against a float64 reference.
Run: python bench/bench_pim_functional.py [--tokens N] [--repeat R]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from l3.devices.pim.functional import FunctionalPim
from l3.specs.dram import DramSpec, get_org, get_timing
from l3.specs.pim import PimSpec


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, gqa: int) -> np.ndarray:
    """softmax(q k^T / sqrt(E)) v in float64: q (heads, E), k and v (T, kv_heads, E)."""
    k64 = np.repeat(k.astype(np.float64), gqa, axis=1)
    v64 = np.repeat(v.astype(np.float64), gqa, axis=1)
    x = np.einsum("he,the->ht", q.astype(np.float64), k64) / np.sqrt(q.shape[-1])
    p = np.exp(x - x.max(axis=1, keepdims=True))
    return np.einsum("ht,the->he", p / p.sum(axis=1, keepdims=True), v64)


def run(name: str, gqa: int, tokens: int, repeat: int, rng: np.random.Generator) -> None:
    kv_heads, head_dim = 8, 128
    dram = DramSpec(timing=get_timing("ddr4-3200"), org=get_org("ddr4-8gb-x8-1ch"))
    pim = FunctionalPim(dram, PimSpec(), n_layers=1, n_kv_heads=kv_heads, head_dim=head_dim, gqa_group=gqa)
    k = rng.standard_normal((tokens, kv_heads, head_dim)).astype(np.float16)
    v = rng.standard_normal((tokens, kv_heads, head_dim)).astype(np.float16)
    q = rng.standard_normal((1, kv_heads * gqa, head_dim)).astype(np.float16)
    t0 = time.perf_counter()
    pim.append(0, 0, k, v)
    t_append = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = pim.attend([0], 0, q)
        best = min(best, time.perf_counter() - t0)
    ref = reference(q[0], k, v, gqa)
    err = np.linalg.norm(out[0] - ref) / np.linalg.norm(ref)
    print(f"{name:6s} N_hc={pim.layout.n_hc} tokens={tokens} append {t_append:.3f} s  "
          f"attend {best:.3f} s  rel.err {err:.2e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng()
    for name, gqa in (("GQA-8", 8), ("MHA-8", 1)):
        run(name, gqa, args.tokens, args.repeat, rng)


if __name__ == "__main__":
    main()
