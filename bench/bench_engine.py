"""The real engine against transformers `generate` (decode tokens/s at batch 1, 8 and 32, side by side), the cpu
attention backend's read bandwidth against this machine's DRAM, and the scheduler's predictor errors on the
measured times. Prints a markdown table. Usage: python bench/bench_engine.py [--model smollm2] [--new-tokens 64]

The same figures as `l3 bench-engine`."""

from __future__ import annotations

import argparse
import platform

import torch

from l3.engine import bench
from l3.engine.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--backends", default="cpu,gpu")
    ap.add_argument("--pim-tokens", type=int, default=32, help="new tokens of the pim fidelity check (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per batch size (medians are reported)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model(a.model, device=device)
    res = bench.run(lm, tuple(int(b) for b in a.batches.split(",")), a.new_tokens, tuple(a.backends.split(",")),
                    a.repeats)  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"model {res['model']}, dense device {device} ({name}), {torch.get_num_threads()} threads, "
          f"{a.new_tokens} new tokens per request, measured; medians of {a.repeats} rounds\n")
    print("| batch | backend | engine tok/s | transformers tok/s | speedup (range over rounds) |"
          " PIM-side pred. err. median / p90 | GPU-side pred. err. median / p90 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        errs = []
        for key in ("pim_predictor_error", "gpu_predictor_error"):
            e = r[key] or {}
            errs.append(f"{e['median']:.1%} / {e['p90']:.1%}" if e.get("median") is not None else "-")
        print(f"| {r['batch']} | {r['backend']} | {r['engine_tok_s']:.1f} | {r['transformers_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x ({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) | {errs[0]} | "
              f"{errs[1]} |")  # fmt: skip
    print(f"\ncpu attention backend over a 32K-token fp16 KV (one 8B-shaped layer, 8 KV heads x 128): "
          f"{res['cpu_attention_bw_bytes_per_s'] / 1e9:.2f} GB/s in {res['cpu_attention_step_s'] * 1e3:.1f} ms; "
          f"DRAM read bandwidth {res['dram_read_bw_bytes_per_s'] / 1e9:.2f} GB/s: "
          f"{res['cpu_attention_bw_fraction']:.0%} (median round; {res['cpu_attention_bw_fraction_range'][0]:.0%}-"
          f"{res['cpu_attention_bw_fraction_range'][1]:.0%} over the rounds)")
    print(f"\ndense forms chosen on this machine (weight rows x columns, row bucket): {res['dense_forms']}")
    if a.pim_tokens:
        fid = bench.pim_fidelity(lm, bench._prompts(lm.spec.vocab_size, 4, seed=1), a.pim_tokens)
        print(f"\npim backend against gpu (fp32 attention), {fid['requests']} requests x {a.pim_tokens} new tokens: "
              f"{fid['identical']} identical, first divergence {fid['first_divergence']}, max |logit difference| "
              f"{fid['max_logit_deviation']:.4f}; the DIMM-PIM device model's decode attention for these steps: "
              f"{fid['pim_simulated_s'] * 1e3:.2f} ms (simulated)")


if __name__ == "__main__":
    main()
