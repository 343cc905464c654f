"""Error of the GPU cost model against measured H100 operator times (markdown tables for docs/gpu-model.md).

Usage: python bench/gpu_model_error.py [PROFILE_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from l3.devices.gpu_profiles import GEMMS, OTHERS, find_profiles, gemm_error_table


def main() -> None:
    root = find_profiles(Path(sys.argv[1])) if len(sys.argv) > 1 else find_profiles()
    if root is None:
        sys.exit("error: measured profiles not found; pass the folder holding gpu_profiles/ or set L3_DATA_DIR")
    for title, ops in (("Projection and FFN GEMMs", GEMMS), ("Memory-bound elementwise kernels", OTHERS)):
        t = gemm_error_table(root, ops=ops)
        print(f"\n### {title} (H100-SXM, TP 1/2/4/8, 1-4096 tokens)\n")
        print("| model | operator | median abs error | median signed error | p90 abs error | points |")
        print("|---|---|---|---|---|---|")
        for r in t.itertuples():
            print(f"| {r.model} | {r.operator} | {r.median_abs_error:.1%} | {r.median_error:+.1%} | "
                  f"{r.p90_abs_error:.1%} | {r.points} |")
        print("\nmedian over models of the median abs error: "
              + ", ".join(f"{op} {v:.1%}" for op, v in t.groupby('operator')['median_abs_error'].median().items()))


if __name__ == "__main__":
    main()
