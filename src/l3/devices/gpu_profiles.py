"""Compare the GPU cost model with measured per-operator H100 times (Vidur's profiles, MIT licence).

The profiles time each operator of one decoder layer for 1..4096 tokens at TP 1/2/4/8. The model shape comes
from the profile's own config columns, so any profiled model can be checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from l3.devices.gpu import GpuCostModel, GpuModelParams
from l3.errors import WorkloadError
from l3.specs.hardware import get_gpu, get_link
from l3.specs.model import ModelSpec
from l3.workload.registry import find_data_dir

PROFILE_MODELS = ("Llama-2-7b-hf", "Llama-2-70b-hf", "CodeLlama-34b-Instruct-hf", "internlm-20b", "Qwen-72B",
                  "phi-2")  # fmt: skip
GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
OTHERS = ("input_layernorm", "attn_rope", "mlp_act", "add")
REL = Path("gpu_profiles/vidur/compute/h100")


def find_profiles(root: Path | None = None) -> Path | None:
    """The H100 profile folder under `root` (a `shared/data` folder), else beside the trace data folder that
    the workloads find ($L3_DATA_DIR or a `shared/data/traces` above); None when there is none."""
    if root is None:
        try:
            root = find_data_dir().parent
        except WorkloadError:
            return None
    return root / REL if (root / REL).is_dir() else None


def _spec_from_row(name: str, row: pd.Series) -> ModelSpec:
    heads = int(row["n_head"])
    return ModelSpec(name=name, n_layers=1, d_model=int(row["n_embd"]), n_heads=heads,
                     n_kv_heads=int(row["n_kv_head"]), head_dim=int(row["n_embd"]) // heads,
                     ffn_dim=int(row["n_expanded_embd"]), ffn_kind="gated" if bool(row["use_gated_mlp"]) else "plain",
                     vocab_size=int(row["vocab_size"]))  # fmt: skip


def operator_errors(profiles: Path, params: GpuModelParams | None = None) -> pd.DataFrame:
    """One row per (model, TP, tokens, operator): measured and modelled seconds and relative error."""
    params = params or GpuModelParams()
    rows = []
    for csv in sorted(profiles.glob("*/*/mlp.csv")):
        name = csv.parent.name
        df = pd.read_csv(csv)
        spec = _spec_from_row(name, df.iloc[0])
        for tp, grp in df.groupby("num_tensor_parallel_workers"):
            cost = GpuCostModel(spec, get_gpu("h100-sxm"), int(tp), get_link("nvlink4"), params)
            modelled = cost.op_times(grp["num_tokens"].to_numpy())
            for op in GEMMS + OTHERS:
                measured = grp[f"time_stats.{op}.median"].to_numpy() * 1e-3
                rows.append(
                    pd.DataFrame(
                        {
                            "model": name,
                            "tp": int(tp),
                            "tokens": grp["num_tokens"].to_numpy(),
                            "operator": op,
                            "measured_s": measured,
                            "modelled_s": modelled[op],
                        }
                    )
                )
    out = pd.concat(rows, ignore_index=True)
    out["rel_error"] = (out["modelled_s"] - out["measured_s"]) / out["measured_s"]
    return out


def gemm_error_table(profiles: Path, params: GpuModelParams | None = None, ops=GEMMS) -> pd.DataFrame:
    """Per model and operator: median |error|, median signed error, p90 |error| over all TP and token counts."""
    err = operator_errors(profiles, params)
    err = err[err["operator"].isin(ops)]
    g = err.groupby(["model", "operator"])["rel_error"]
    return pd.DataFrame({
        "median_abs_error": g.apply(lambda e: float(np.median(np.abs(e)))),
        "median_error": g.median(),
        "p90_abs_error": g.apply(lambda e: float(np.percentile(np.abs(e), 90))),
        "points": g.size(),
    }).reset_index()  # fmt: skip
