"""DIMM-PIM timing benchmark: surrogate vs command-level engine, surrogate speed, effective attention
bandwidth with its breakdown, and the ablation of L3's hardware fixes. Prints markdown tables.

Run: python bench/bench_pim_timing.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from l3.devices.pim.device import PimDevice
from l3.devices.pim.report import ablation, pim_report
from l3.specs.dram import DramSpec, get_org, get_timing
from l3.specs.model import get_model
from l3.specs.pim import PimFeatures, PimSpec

DRAM = DramSpec(timing=get_timing("ddr4-3200"), org=get_org("ddr4-l3-2tb"))
MODELS = {1: "opt-66b", 4: "llama-3-8b", 8: "qwen-72b"}  # GQA group -> model


def sweep(quick: bool) -> None:
    contexts = [1, 16, 256, 4096, 16384, 65536, 262144]
    batches = [1, 16, 64, 256]
    n_hcs = [1, 2, 4, 8]
    if quick:
        contexts, batches, n_hcs = [1, 4096, 65536], [1, 256], [1, 8]
    print("## 1. Surrogate vs command-level engine (one layer, busiest rank and every busy rank)\n")
    print("Sweep: GQA group 1 / 4 / 8 (" + ", ".join(MODELS.values()) + f"), N_hc {n_hcs}, batch {batches}, "
          f"context {contexts}; points whose KV exceeds the device capacity are skipped.\n")  # fmt: skip
    errs, worst, skipped, t0 = [], (0.0, None), 0, time.time()
    for gqa, name in MODELS.items():
        model = get_model(name)
        for n_hc in n_hcs:
            dev = PimDevice(DRAM, PimSpec(features=PimFeatures(n_hc=n_hc)), model)
            for batch in batches:
                for ctx in contexts:
                    if batch * ctx > dev.kv_capacity_tokens:
                        skipped += 1
                        continue
                    c = np.full(batch, ctx)
                    rank = dev.layer_ranks(0, dev.default_channels(batch))
                    fast = dev.layer_attention_time(c, rank)
                    exact, _ = dev.engine_layer_attention_time(c, rank)
                    busy = exact > 0
                    e = np.abs(fast[busy] / exact[busy] - 1)
                    errs.append(e.max())
                    if e.max() > worst[0]:
                        worst = (e.max(), (name, f"gqa {gqa}", f"N_hc {n_hc}", f"batch {batch}", f"ctx {ctx}"))
    errs = np.array(errs) * 100
    print("| points | skipped (over capacity) | max error | median error | mean error | worst point | time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(errs)} | {skipped} | {errs.max():.2f}% | {np.median(errs):.2f}% | {errs.mean():.2f}% | "
          f"{', '.join(worst[1])} | {time.time() - t0:.0f} s |\n")  # fmt: skip


def speed() -> None:
    print("## 2. Surrogate speed\n")
    print("| model | query | queries | seconds | queries / s |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in ("opt-66b", "qwen-72b"):
        dev = PimDevice(DRAM, PimSpec(), get_model(name))
        n = 200_000
        batch, ctx = rng.integers(1, 257, n), rng.integers(1, 262145, n)
        dev.uniform_step_time(batch, ctx)  # fills the measured range once
        t0 = time.perf_counter()
        dev.uniform_step_time(batch, ctx)
        dt = time.perf_counter() - t0
        print(f"| {name} | (batch, context) shape -> step time, vectorised | {n} | {dt:.3f} | {n / dt:,.0f} |")
        calls, contexts = 2000, rng.integers(1, 65537, (2000, 256))
        ranks = rng.integers(0, dev.n_ranks, (2000, 256))
        dev.layer_attention_time(contexts[0], ranks[0])
        t0 = time.perf_counter()
        for c, r in zip(contexts, ranks, strict=True):
            dev.layer_attention_time(c, r)
        dt = time.perf_counter() - t0
        print(f"| {name} | layer_attention_time, 256 mixed requests | {calls} | {dt:.3f} | {calls / dt:,.0f} |")
    print()


def bandwidth() -> None:
    print("## 3. Effective attention bandwidth (DDR4-3200, 16 ch x 2 DIMM x 2 rank, 2 TB; default PimSpec)\n")
    print("Batch 64 = one request per rank in every layer (balanced), or the largest batch whose KV fits in 2 TB "
          "where 64 do not.\n")  # fmt: skip
    cats = None
    for name in ("opt-66b", "qwen-72b"):
        for ctx in (4096, 16384, 65536):
            cap = PimDevice(DRAM, PimSpec(), get_model(name)).kv_capacity_tokens
            r = pim_report(DRAM, PimSpec(), get_model(name), ctx, min(64, cap // ctx))
            if cats is None:
                cats = list(r["breakdown"])
                print("| model | N_hc | context | batch | step (ms) | eff. BW (TB/s) | % of peak | " + " | ".join(cats)
                      + " |")  # fmt: skip
                print("|---" * (7 + len(cats)) + "|")
            t = r["step_attention_time_s"]
            bd = " | ".join(f"{100 * r['breakdown'][c] / t:.1f}%" for c in cats)
            print(f"| {name} | {r['n_hc']} | {ctx} | {r['batch']} | {1e3 * t:.2f} | "
                  f"{r['effective_attention_bw_bytes_per_s'] / 1e12:.2f} | "
                  f"{100 * r['effective_attention_bw_bytes_per_s'] / r['peak_attention_bw_bytes_per_s']:.1f}% | "
                  f"{bd} |")  # fmt: skip
    print(f"\nPeak bank-level bandwidth: {r['peak_attention_bw_bytes_per_s'] / 1e12:.2f} TB/s.\n")


def ablations() -> None:
    print("## 4. Ablation of the hardware fixes (context 16384, batch 64 or the largest that fits)\n")
    print("| model | fix disabled | step attention (ms) | slowdown | decode KV write (us) | prefill KV write (s) "
          "| mechanism |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in ("opt-66b", "qwen-72b"):
        cap = PimDevice(DRAM, PimSpec(), get_model(name)).kv_capacity_tokens
        for r in ablation(DRAM, PimSpec(), get_model(name), 16384, min(64, cap // 16384)):
            print(f"| {name} | {r['fix_disabled']} | {1e3 * r['step_attention_time_s']:.2f} | "
                  f"{r['slowdown']:.2f}x | {1e6 * r['decode_write_time_s']:.1f} | "
                  f"{r['prefill_write_time_s']:.3f} | {r['mechanism']} |")  # fmt: skip
    print()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small sweep (for smoke runs)")
    args = ap.parse_args()
    speed()
    bandwidth()
    ablations()
    sweep(args.quick)
