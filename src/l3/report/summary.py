"""Turn a simulation result into the summary dict (summary.json) and the per-request table."""

from __future__ import annotations

from collections import Counter

import numpy as np

from l3.sched.kv import HBM_TIER
from l3.sched.predictors import ErrorLog
from l3.sched.requests import Status
from l3.sched.subbatch import SubBatchScheduler
from l3.sched.timing import ENERGY_PARTS, IMBALANCE_DECODE_BINS
from l3.sim.simulator import SimResult


def _pct(x: np.ndarray, q: float) -> float | None:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if len(x) else None


def summarize(res: SimResult, wall_parts: dict[str, float] | None = None) -> dict:
    """The run's headline numbers. Everything here is simulated except `wall_time_s`: the command's measured
    wall time, the sum of `wall_parts` (seconds per part of the command; default: the simulation alone)."""
    t, m, dep = res.table, res.metrics, res.deployment
    done = t.status == Status.DONE
    out_tokens = int(t.output[done].sum())
    sim_t = res.simulated_time_s
    ttft = (t.first_token_s - t.arrival)[done]
    e2e = (t.finish_s - t.arrival)[done]
    reasons = Counter(t.reject_code.values())
    replica_time = sim_t * res.system.replicas
    t50, t90 = m.output_times([0.5, 0.9])
    parts = dict(wall_parts) if wall_parts else {"simulate": res.wall_time_s}
    return {
        "system": dep.system.name,
        "model": dep.model.name,
        "workload": res.workload.name,
        "workload_mode": res.workload.mode,
        "workload_source": res.workload.source,
        "deployment": dep.describe(),
        "parallelism": {k: v for k, v in dep.selection.items() if k != "candidates"},
        "parallelism_candidates": dep.selection.get("candidates", []),
        "what_is_simulated": "all times are simulated by analytic device models; wall_time_s is measured",
        "attention_model": res.system.attention_model,
        "requests_total": int(t.n),
        "requests_completed": int(done.sum()),
        # trace rows the loader refused as impossible (never in the request count), by reason
        "rows_refused": {"count": res.workload.rows_refused, "reasons": dict(res.workload.refused_reasons)},
        "requests_rejected": int((t.status == Status.REJECTED).sum()),
        "reject_reasons": dict(reasons),
        "output_tokens": out_tokens,
        "throughput_tok_s": out_tokens / sim_t if sim_t > 0 else 0.0,
        "steady_throughput_tok_s": m.steady_throughput(),
        "t50_output_s": _finite(t50),
        "t90_output_s": _finite(t90),
        **bound_summary(res, out_tokens),
        **energy_summary(res, out_tokens),
        "mean_batch_size": m.mean_batch_size,
        "iterations": m.steps,
        "preemptions": int(t.preemptions.sum()),
        "kv_capacity_tokens_per_replica": int(res.system.kv_capacity_tokens),
        "kv_capacity_bytes": int(res.system.kv_capacity_tokens) * dep.model.kv_bytes_per_token * res.system.replicas,
        "attention_peak_bw_bytes_per_s": res.system.attention_bw * res.system.replicas,
        "tbt_histogram": {"log10_lo": m.tbt.LO, "bins_per_decade": m.tbt.PER_DECADE,
                          "counts": sparse_counts(m.tbt.counts)},
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tbt_p50_s": m.tbt.quantile(0.50),
        "tbt_p90_s": m.tbt.quantile(0.90),
        "tbt_p99_s": m.tbt.quantile(0.99),
        "e2e_p50_s": _pct(e2e, 50),
        "e2e_p99_s": _pct(e2e, 99),
        "busy_fraction": {d: (b / replica_time if replica_time > 0 else 0.0) for d, b in m.busy.items()},
        "kv_tiers": kv_tier_summary(res),
        "simulated_time_s": sim_t,
        "wall_time_s": sum(parts.values()),
        "wall_time_parts_s": parts,
        **coordination_summary(res),
    }


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def energy_summary(res: SimResult, out_tokens: int) -> dict:
    """The run's energy (docs/energy.md): the iterations' dynamic energy plus every replica's static power
    (SystemModel.static_power) over the whole run, joules by sched.timing.ENERGY_PARTS (they sum to
    `energy_j`), and per output token."""
    parts = dict.fromkeys(ENERGY_PARTS, 0.0)
    for k, v in res.metrics.energy_j.items():
        parts[k] += v
    for k, w in res.system.static_power().items():
        parts[k] += w * res.system.replicas * res.simulated_time_s
    total = sum(parts.values())
    return {"energy_j": total, "energy_j_per_token": total / out_tokens if out_tokens else None,
            "energy_breakdown_j": parts}


def bound_summary(res: SimResult, out_tokens: int) -> dict:
    """The hardware's bound on the batches the run executed, how close the run came, and where the rest went.

    bound_tok_s: output tokens over the sum of every step's bound, spread evenly over the replicas (so the
    bound also assumes replicas that never wait for each other or for arrivals). steady_bound_fraction: the
    same over the steady-state window (10%-90% of the output): its bound time over the window's replica time,
    which is what steady-state throughput is to its bound there. time_breakdown: fractions of
    the replicas' total time (replicas x makespan) spent at the bound, lost to each cause in sched.timing.LOSSES,
    and idle (`replica_idle`: waiting for arrivals, or done before the last replica); they sum to 1.
    """
    m, replicas, sim_t = res.metrics, res.system.replicas, res.simulated_time_s
    replica_time = sim_t * replicas
    if m.bound_s <= 0 or replica_time <= 0:
        return {"bound_tok_s": None, "bound_fraction": None, "steady_bound_fraction": None, "time_breakdown": {}}
    breakdown = {"bound": m.bound_s, **m.losses, "replica_idle": replica_time - m.busy_s}
    t10, t90 = m.output_times([0.1, 0.9])
    steady_bound = m.steady_bound_s()
    return {
        "bound_tok_s": out_tokens * replicas / m.bound_s,
        "bound_fraction": m.bound_s / replica_time,
        "steady_bound_fraction": steady_bound / (replicas * (t90 - t10)) if steady_bound is not None else None,
        "time_breakdown": {k: v / replica_time for k, v in breakdown.items()},
    }


def largest_losses(breakdown: dict, top: int, at_least: float = 0.0) -> list[tuple[str, float]]:
    """The `top` largest causes of time beyond the bound in a `time_breakdown` (shares of the replicas' time, at
    least `at_least` each), largest first."""
    items = sorted(((v, k) for k, v in breakdown.items() if k != "bound" and v >= at_least), reverse=True)
    return [(k, v) for v, k in items[:top]]


def kv_tier_summary(res: SimResult) -> dict:
    """KV memory per tier (one, or HBM and the attention device's under asymmetric pipelining): capacity per
    replica, mean share held over the run, and the share of completed requests whose KV ended in HBM."""
    kv, t = res.schedulers[0].kv, res.table
    names = ["hbm", "device"] if kv.tiers == 2 else ["kv"]
    replica_time = res.simulated_time_s * res.system.replicas
    held = res.metrics.kv_block_s
    out = {"names": names, "capacity_tokens_per_replica": (kv.tier_capacity * kv.block_size).tolist(),
           "mean_used_fraction": (held / (kv.tier_capacity * replica_time)).tolist()
           if held is not None and replica_time > 0 else None}  # fmt: skip
    done = t.status == Status.DONE
    if kv.tiers == 2 and done.any():
        out["hbm_request_share"] = float((t.kv_tier[done] == HBM_TIER).mean())
    return out


def sparse_counts(counts: np.ndarray) -> dict[str, float]:
    """Non-zero histogram bins as {bin index: count} (JSON-friendly, small)."""
    idx = np.flatnonzero(counts)
    return {str(int(i)): float(counts[i]) for i in idx}


def imbalance_by_device_decodes(stats: dict[str, float]) -> dict[str, dict[str, float]]:
    """`rank_load_imbalance` apart for each bin of memory-side decodes per sub-batch (sched.timing
    .IMBALANCE_DECODE_BINS; labels such as "4-15", "64+"): the bin's mean imbalance and its share of the layers
    attended on the memory side. Bins with no such layer are left out."""
    edges = IMBALANCE_DECODE_BINS
    out = {}
    for lo, hi in zip(edges, (*edges[1:], None), strict=True):
        layers = stats.get(f"device_layers_n{lo}", 0.0)
        if layers:
            out[f"{lo}-{hi - 1}" if hi else f"{lo}+"] = {"imbalance": stats[f"imbalance_n{lo}"] / layers,
                                                          "layer_share": layers / stats["device_layers"]}
    return out


def coordination_summary(res: SimResult) -> dict:
    """Figures of systems that pair the GPUs with a memory-side device (empty for GPU-only)."""
    m = res.metrics
    if "imbalance" not in m.stats or not m.steps:
        return {}
    reports = [s.report() for s in res.schedulers]
    out = {
        "policy": reports[0].get("policy"),
        # over the layers whose attention ran on the memory side: the mean of the slowest unit's time over the mean
        # working unit's, and the mean fraction of its units with nothing to do
        "rank_load_imbalance": m.stats["imbalance"] / m.stats["device_layers"] if m.stats["device_layers"]
        else None,
        "idle_rank_fraction": m.stats["idle_unit_layers"] / m.stats["device_layers"] if m.stats["device_layers"]
        else None,
        "rank_load_imbalance_by_device_decodes": imbalance_by_device_decodes(m.stats),
        # seconds merging striped requests' partial attentions (l3-plus): on the GPUs (per GPU group, in the
        # GPU's busy time) and on the host CPUs
        "partial_merge_s": {"gpu": m.stats["merge_gpu_s"], "host": m.stats["merge_host_s"]},
        "gpu_waited_fraction": m.stats["gpu_waited"] / m.steps,
        "pim_waited_fraction": m.stats["pim_waited"] / m.steps,
        "prefill_chunks_shortened": sum(r.get("prefill_chunks_shortened", 0) for r in reports),
        "single_batch_iterations": sum(r.get("single_batch_iterations", 0) for r in reports),
        "device_requests_shed": sum(r.get("device_requests_shed", 0) for r in reports),
        "decodes_moved": sum(r.get("decodes_moved", 0) for r in reports),
        "decodes_moved_into_hbm": sum(r.get("decodes_moved_into_hbm", 0) for r in reports),
        # per rankset, summed over the run (replicas summed): its ranks' mean seconds blocked by transfers into
        # and out of the DIMMs (writes, output reads; without rankset overlap, every write of the rank's channel)
        "transfer_stall_s": {k.removeprefix("transfer_stall_"): v for k, v in m.stats.items()
                             if k.startswith("transfer_stall_")},
    }
    learners = [s for s in res.schedulers if isinstance(s, SubBatchScheduler)]
    out["pim_predictor_error"] = ErrorLog.merged([s.pim_err for s in learners]).summary()
    out["gpu_predictor_error"] = ErrorLog.merged([s.gpu_err for s in learners]).summary()
    return out
