"""Error of the GPU cost model against measured H100 kernel times, and the parameters derived from those
measurements (markdown for docs/gpu-model.md).

Usage: python bench/gpu_model_error.py [PROFILE_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from l3.devices.gpu import GpuModelParams
from l3.devices.gpu_profiles import GEMMS, OTHERS, derived_params, error_table, find_profiles, profile_points

ROW = "| {} | {:.1%} | {:+.1%} | {:.1%} | {:.1%} | {} |"


def main() -> None:
    root = find_profiles(Path(sys.argv[1])) if len(sys.argv) > 1 else find_profiles()
    if root is None:
        sys.exit("error: measured profiles not found; pass the folder holding gpu_profiles/ or set L3_DATA_DIR")
    derived, defaults = derived_params(root), GpuModelParams()
    print("### Parameters derived from the profiles\n")
    print("| parameter | derived now | GpuModelParams default |\n|---|---|---|")
    for name in GpuModelParams.model_fields:
        if name in derived.model_fields_set:
            print(f"| `{name}` | {getattr(derived, name)} | {getattr(defaults, name)} |")
    points = profile_points(root)
    print("\n### Every operator, all profiled models and TP degrees\n")
    print("| operator | median abs error | median signed error | p90 abs error | max abs error | points |")
    print("|---|---|---|---|---|---|")
    for r in error_table(points, by=("operator",)).set_index("operator").loc[list(GEMMS + OTHERS)].itertuples():
        print(ROW.format(r.Index, r.median_abs_error, r.median_error, r.p90_abs_error, r.max_abs_error, r.points))
    for title, ops in (("Projection and FFN GEMMs", GEMMS), ("Memory-bound kernels and all-reduce", OTHERS)):
        print(f"\n### {title} per model (H100-SXM, TP 1/2/4/8, 1-4096 tokens)\n")
        print("| model / operator | median abs error | median signed error | p90 abs error | max abs error | points |")
        print("|---|---|---|---|---|---|")
        for r in error_table(points[points["operator"].isin(ops)]).itertuples():
            print(ROW.format(f"{r.model} / {r.operator}", r.median_abs_error, r.median_error, r.p90_abs_error,
                             r.max_abs_error, r.points))  # fmt: skip


if __name__ == "__main__":
    main()
