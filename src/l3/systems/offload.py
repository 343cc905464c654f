"""Systems that run decode attention on a memory-side device beside the GPUs (L3 and the baselines).

One replica's iteration (per layer, per sub-batch X in {A, B}):
  GPU: [post-attention of layer l-1] + QKV projection  -> link up: the decode tokens' Q, K, V
  memory side: decode attention of X's requests on its units  -> link down: attention output
  GPU: prefill attention of X's chunks (concurrently); the next layer's work waits for both.
With `coordination.pipeline`, the GPU runs one sub-batch's dense work while the memory side serves the other's
attention (NeuPIMs-style interleaving); without it every part runs back to back (the plain sum of parts).
Subclasses say what the units are, how long a layer's attention occupies each, and what the KV capacity is.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import abstractmethod

import numpy as np

from l3.devices.gpu import GpuCostModel
from l3.sched import Topology
from l3.sched.plan import BatchShape, Plan
from l3.sched.requests import RequestTable
from l3.sched.subbatch import tokens_at_slot
from l3.sched.timing import IterationTiming, decode_bin
from l3.specs.system import Deployment
from l3.systems.base import SystemModel
from l3.systems.layer_clock import PART_ROWS, layer_times, unit_loads

BULK_SAMPLE_EVERY = 256  # steps between exact memory-side evaluations in a multi-step run (linear in between)
WAIT_THRESHOLD = 0.05  # a side "waited" in an iteration if it idled more than this fraction of it


class AttentionOffloadSystem(SystemModel):
    """Units are numbered channel * R + rankset (R = 1 for devices without ranksets)."""

    memory_device = "pim"  # name of the memory-side device in reports
    host_merge_w = 0.0  # power of the host CPUs' share while they merge partial outputs (L3: its replica's share)

    def __init__(self, dep: Deployment, ranksets: int, channels: int):
        self.dep = dep
        m = dep.model
        self.gpu = GpuCostModel(m, dep.gpu, dep.tp, dep.nvlink, dep.system.gpu.model)
        self.coord = dep.system.coordination
        self.ranksets, self.channels = ranksets, channels
        self.n_ranks = ranksets * channels
        self._rank_lanes = [f"rankset{r % ranksets}/rank{r}" for r in range(self.n_ranks)]  # timeline lane names
        self._gpu_parts = functools.lru_cache(maxsize=4096)(self._gpu_parts_uncached)
        self._dense = functools.lru_cache(maxsize=4096)(self._dense_uncached)
        # embed_and_head(t, n): its parts recur apart (token and sampled counts pair up anew in most iterations)
        self._embedding = functools.lru_cache(maxsize=4096)(lambda t: float(self.gpu.embedding(t)))
        self._lm_head = functools.lru_cache(maxsize=4096)(lambda n: tuple(map(float, self.gpu.lm_head(n))))
        self._rankset_lanes = tuple(f"rankset{s}" for s in range(ranksets)) if ranksets > 1 else ()
        self.devices = ("gpu", self.memory_device, "pcie_up", "pcie_down", *self._rankset_lanes)
        self._stall_names = [f"transfer_stall_rankset{q}" for q in range(ranksets)]
        # Bytes per token per layer crossing the link.
        self._qkv_bytes = (m.q_dim + 2 * m.kv_dim) * m.dtype_bytes
        self._out_bytes = m.q_dim * m.dtype_bytes
        self._kv_layer = m.kv_bytes_per_token_layer
        self._layers_per_residue = np.bincount(np.arange(m.n_layers) % ranksets, minlength=ranksets)

    @property
    @abstractmethod
    def slots(self) -> int:
        """Placement positions the scheduler chooses among at admission."""

    def pim_layer_work(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets, pre_prefix=None,
                       order=None, pre_order=None) -> np.ndarray:  # fmt: skip
        """Seconds each unit is occupied by one layer's attention of a sub-batch: (offsets, R residues, units).

        ctx: tokens attended per decode request at step offset 0 (grows by one per step); `placement`: their
        slots. Prefill requests `pre_ids` at slots `pre_place` write `pre_tokens` tokens of KV per layer, after
        the `pre_prefix` they already hold (None: 0). `order`, `pre_order`: their decided stripe slots (`spread`)."""
        return self.pim_layer_work_split(ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets, pre_prefix,
                                         order, pre_order)[0]  # fmt: skip

    @abstractmethod
    def pim_layer_work_split(self, ids, ctx, placement, pre_ids, pre_tokens, pre_place, offsets, pre_prefix=None,
                             order=None, pre_order=None) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
        """`pim_layer_work`, the part of it each unit is blocked by transfers rather than attending, and the
        layer's dynamic energy on the memory side at each offset (J by sched.timing.ENERGY_PARTS, (offsets,))."""

    def topology(self) -> Topology:
        """Decode attention on the memory side: the scheduler places requests on its slots and sub-batches."""
        return Topology(kv_tiers=self.kv_tiers, slots=self.slots, spread=self.spread, groups=self.groups,
                        stripe=self.decided_stripe)

    @property
    def link_j_per_byte(self) -> float:
        """Energy of one byte between the GPUs and the memory side (J): the GPU's host link."""
        return self.dep.host_link.pj_per_bit * 8e-12

    def pcie(self, nbytes):
        """One transfer (or an array of them) split over the TP group's host links (one per GPU), seconds."""
        if isinstance(nbytes, (int, float)) and nbytes == 0:
            return 0.0  # nothing crosses (most iterations move no KV between tiers)
        t = self.dep.host_link.transfer_time(np.asarray(nbytes, float) / self.dep.tp)
        return float(t) if t.ndim == 0 else t

    decided_stripe = None  # (placement -> (n, D) slots of each request's stripe) where the scheduler decides
    # the slot of each new chunk (`coordination.chunk_order = "least-loaded"`)

    def spread(self, placement: np.ndarray, tokens: np.ndarray,
               order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """Where requests' tokens lie: (request index, slot, tokens) for each (request, slot) holding any, request
        i being at slot placement[i] with tokens[i] tokens; `order`: decided stripe slots of striped requests.
        Here a request's tokens all lie at its slot."""
        return tokens_at_slot(placement, tokens)

    def outputs(self, ctx: np.ndarray, placement: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
        """How a sub-batch's attention outputs return, per layer at each step offset: `down_bytes` over the host
        link, and the seconds the GPU (`merge_gpu_s`) or host (`merge_host_s`) spends merging partial outputs.
        Here: one whole output per decode request (the `down` part), nothing to merge."""
        return {}

    # --- the iteration --------------------------------------------------------------------------------
    def run(self, plan: Plan, table: RequestTable, steps: int, record: bool = False) -> IterationTiming:
        L = self.dep.model.n_layers
        interp = step_interpolation(steps)
        offsets = interp.offsets
        grow = np.arange(steps, dtype=float)  # each step every decode request attends one token more
        subs = []
        whole = {"tokens": 0, "sampled": 0, "flops": np.zeros(steps), "bytes": np.zeros(steps),
                 "device_ctx": np.zeros(steps), "hbm_kv_tokens": 0}  # the whole batch: bound, energy  # fmt: skip
        for s in (0, 1):
            sb = plan.sub_batch(s)
            if sb.empty:
                continue
            ctx = table.context(sb.decode_ids).astype(float)
            on_gpu = ~sb.decode_on_device
            # KV moving into HBM crosses the host links behind this sub-batch's outputs, every layer.
            migrating = ctx[np.isin(sb.decode_ids, plan.migrate_ids)].sum() if len(plan.migrate_ids) else 0.0
            dev, pre = sb.decode_ids[sb.decode_on_device], sb.prefill_on_device
            pre_ids, pre_chunks = sb.prefill_ids[pre], sb.prefill_chunks[pre]
            # The memory side serves the whole sub-batch, whichever GPU group each request is dealt to.
            work, stalled, energy = self.pim_layer_work_split(
                dev, ctx[~on_gpu], table.placement[dev], pre_ids, pre_chunks, table.placement[pre_ids], offsets,
                pre_prefix=sb.prefill_prefix[pre], order=table.stripe[dev],
                pre_order=table.stripe[pre_ids])  # fmt: skip
            shape = BatchShape.of(sb, ctx)
            gpu_ctx = ctx[on_gpu].sum() + on_gpu.sum() * grow
            flops, nbytes = self.gpu.attention_work(shape.prefill_pairs + gpu_ctx, shape.prefill_kv_tokens + gpu_ctx)
            whole["tokens"] += shape.n_tokens
            whole["sampled"] += shape.n_sampled
            whole["flops"] += flops
            whole["bytes"] += nbytes
            whole["device_ctx"] += ctx[~on_gpu].sum() + len(dev) * grow
            whole["hbm_kv_tokens"] += int(on_gpu.sum() + sb.prefill_chunks[~pre].sum())
            shares = [(sb, ctx, shape)] if self.groups == 1 else [
                (g, ctx[d], BatchShape.of(g, ctx[d])) for g, d, _ in deal(sb, self.groups)]
            per_group = [self._group_parts(*share, table.placement, offsets, interp, grow) for share in shares]
            # The groups run each layer in step (every group's attention of the sub-batch returns together):
            # a part takes its slowest group's time; devices are busy for the groups' mean. The host merges
            # every group's partials.
            parts, mean = per_group[0], per_group[0]
            if len(per_group) > 1:
                parts = {k: functools.reduce(np.maximum, [p[k] for p in per_group]) for k in mean}
                parts["host_merge"] = sum(p["host_merge"] for p in per_group)
                mean = {k: sum(p[k] for p in per_group) / len(per_group) for k in mean}
            down_bg = self.pcie(migrating * self._kv_layer)
            energy = {k: interp(np.asarray(v, float)) for k, v in energy.items()}
            *loads, work = unit_loads(np.ascontiguousarray(work), np.ascontiguousarray(stalled), interp.segment,
                                      interp.weight0, interp.weight, self._layers_per_residue, self.channels)
            subs.append({"s": s, "n_dec": len(dev), "work": work, "loads": loads, **parts,
                         "down_bg": down_bg, "mean": mean | {"down_bg": down_bg},
                         "energy": energy,
                         "pcie_bytes": mean["pcie_bytes"] * len(per_group) + migrating * self._kv_layer})  # fmt: skip
        timing = self._schedule(subs, L, steps, record)
        return self._with_energy(self._with_bound(timing, subs, whole), subs, whole)

    def _group_parts(self, sb: Plan, ctx: np.ndarray, shape: BatchShape, placement: np.ndarray,
                     offsets: np.ndarray, interp: StepInterpolation, grow: np.ndarray) -> dict:  # fmt: skip
        """Per-layer seconds of one GPU group's share `sb` of a sub-batch: its dense work, its prefill (and, under
        asymmetric pipelining, HBM-tier decode) attention, its host-link transfers and the merging of its
        requests' partial outputs. ctx: tokens attended per decode request."""
        on_gpu, dev, link = ~sb.decode_on_device, sb.decode_ids[sb.decode_on_device], sb.link()
        parts = self._gpu_parts(shape.n_tokens, link.decodes, link.prefill_kv_tokens, shape.prefill_pairs,
                                shape.prefill_kv_tokens, shape.n_sampled)  # fmt: skip
        if on_gpu.any():  # asymmetric pipelining: these requests' attention runs on the GPU, KV in HBM
            gpu_ctx = ctx[on_gpu].sum() + on_gpu.sum() * grow
            parts = parts | {"pattn": parts["pattn"] + self.gpu.decode_attention(on_gpu.sum(), gpu_ctx)}
        outs = {k: interp(v) for k, v in self.outputs(ctx[~on_gpu], placement[dev], offsets).items()}
        down_bytes = outs.get("down_bytes", parts["down_bytes"])
        return parts | {"down": self.pcie(outs["down_bytes"]) if "down_bytes" in outs else parts["down"],
                        "merge": outs.get("merge_gpu_s", 0.0), "host_merge": outs.get("merge_host_s", 0.0),
                        "pcie_bytes": parts["up_bytes"] + down_bytes}  # fmt: skip

    def _gpu_parts_uncached(self, n_tokens, n_decode, prefill_tokens, pairs, kv_tokens, n_sampled) -> dict:
        """Per-layer GPU and PCIe seconds of a sub-batch (the same shapes recur: cached). n_decode and
        prefill_tokens count only the requests whose KV lives on the memory side (what crosses the link)."""
        pre, post = self._dense(n_tokens)
        norm, vocabulary = self._lm_head(n_sampled)
        head = self._embedding(n_tokens) + norm + vocabulary  # as GpuCostModel.embed_and_head adds them
        up, down = n_decode * self._qkv_bytes + prefill_tokens * self._kv_layer, n_decode * self._out_bytes
        return {"pre": pre, "pattn": float(self.gpu.prefill_attention(pairs, kv_tokens)), "post": post,
                "head": head, "up": self.pcie(n_decode * self._qkv_bytes),
                "up_bg": self.pcie(prefill_tokens * self._kv_layer), "down": self.pcie(n_decode * self._out_bytes),
                "up_bytes": float(up), "down_bytes": float(down)}  # fmt: skip

    def _dense_uncached(self, n_tokens: int) -> tuple[float, float]:
        """Per-layer GPU seconds of the dense work before and after attention for n_tokens tokens (token counts
        recur far more often than whole sub-batch shapes: cached on their own)."""
        layer = self.gpu.layer(n_tokens, 0, 0.0, 0.0, 0.0)
        return float(layer.pre_attn), float(layer.post_attn)

    def _schedule(self, subs: list[dict], L: int, steps: int, record: bool) -> IterationTiming:
        """Run the per-layer dependency graph on the GPU, the PCIe directions and every rank, per step
        (`layer_clock`). Each rank serves one sub-batch's layer after another; different ranks run concurrently."""
        parts = np.empty((len(subs), len(PART_ROWS), steps))
        for i, x in enumerate(subs):
            for j, k in enumerate(PART_ROWS):
                parts[i, j] = x[k]
        works = [x["work"] for x in subs]
        durations, intervals = layer_times(L, self.ranksets, not self.coord.pipeline, [x["s"] for x in subs], parts,
                                           works, record, self._rank_lanes)  # fmt: skip
        return self._timing(subs, L, steps, durations, intervals)

    def _timing(self, subs, L, steps, durations, intervals) -> IterationTiming:
        R = self.ranksets
        gpu_sub, mem_sub = np.zeros((steps, 2)), np.zeros((steps, 2))
        busy = {d: np.zeros(steps) for d in self.devices}
        imb_sum, idle_sum, imb_n = np.zeros(steps), np.zeros(steps), 0
        by_bin = {}  # the imbalance sums by the sub-batch's count of memory-side decodes: only the bins that occur
        merge = {"merge_gpu_s": np.zeros(steps), "merge_host_s": np.zeros(steps)}
        stall = np.zeros((steps, R))  # per rankset: its ranks' mean time blocked by transfers
        for x in subs:
            slowest, mean, ratio, idle, by_rankset, stalled, _ = x["loads"]
            stall += stalled
            gpu_sub[:, x["s"]] = L * (x["pre"] + x["pattn"] + x["post"] + x["merge"]) + x["head"]
            avg = x["mean"]  # over the GPU groups the sub-batch is dealt to (one, but for a shared pool)
            busy["gpu"] += L * (avg["pre"] + avg["pattn"] + avg["post"] + avg["merge"]) + avg["head"]
            busy["pcie_up"] += L * (avg["up"] + avg["up_bg"])
            busy["pcie_down"] += L * (avg["down"] + avg["down_bg"])
            # The sub-batch's own PIM time: each layer's slowest rank (what the scheduler balances against
            # the other sub-batch's GPU time). Busy time of `pim` and of each rankset: the mean over their
            # ranks of the time each rank computed (a rank is a serial resource, so this is <= elapsed time).
            mem_sub[:, x["s"]] = slowest
            if x["n_dec"]:
                busy[self.memory_device] += mean
                for q, lane in enumerate(self._rankset_lanes):
                    busy[lane] += by_rankset[:, q]
                imb_sum += ratio
                idle_sum += idle
                imb_n += L
                lo = decode_bin(x["n_dec"])
                by_bin[f"imbalance_n{lo}"] = by_bin.get(f"imbalance_n{lo}", 0.0) + ratio
                by_bin[f"device_layers_n{lo}"] = by_bin.get(f"device_layers_n{lo}", 0.0) + np.full(steps, float(L))
            merge["merge_gpu_s"] += L * avg["merge"]
            merge["merge_host_s"] += L * x["host_merge"]
        stats = {
            # per step, over the layers whose attention ran on the units: their count, and summed over them the
            # slowest / mean working unit's time and the fraction of units idle
            "imbalance": imb_sum,
            "device_layers": np.full(steps, float(imb_n)), "idle_unit_layers": idle_sum, **merge,
            **by_bin,  # the same two by the sub-batch's count of memory-side decodes (timing.IMBALANCE_DECODE_BINS)
            **{name: stall[:, q] for q, name in enumerate(self._stall_names)},
            "gpu_waited": (durations - busy["gpu"] > WAIT_THRESHOLD * durations).astype(float),
            "pim_waited": ((durations - mem_sub.sum(axis=1) > WAIT_THRESHOLD * durations)
                           & (mem_sub.sum(axis=1) > 0)).astype(float),
        }
        return IterationTiming(durations, busy, gpu_sub, mem_sub, stats, intervals)

    def _with_bound(self, timing: IterationTiming, subs: list[dict], whole: dict) -> IterationTiming:
        """`timing` with its bound and the causes of the time beyond it (sched.timing.LOSSES), per step."""
        L = self.dep.model.n_layers
        G = self.groups  # at the bound a dealt batch splits evenly over the GPU groups
        g_bound = self.gpu.roofline(whole["tokens"] / G, whole["sampled"] / G, whole["flops"] / G, whole["bytes"] / G)
        m_bound = whole["device_ctx"] * L * self._kv_layer / self.attention_bw
        steps = len(timing.durations)
        per_unit, chain = np.zeros((steps, self.n_ranks)), 0.0
        for x in subs:  # each unit's time over the whole iteration (a unit is a serial resource)
            per_unit += x["loads"][-1]
            chain += L * (x["up"] + x["down"] + x["down_bg"] + x["host_merge"])
        working = (per_unit > 0).sum(axis=1)
        m_all, m_max = per_unit.mean(axis=1), per_unit.max(axis=1)
        m_act = np.where(working > 0, per_unit.sum(axis=1) / np.maximum(working, 1), 0.0)
        d, gpu = timing.durations, timing.sub_gpu_s.sum(axis=1)  # the slowest GPU group's time
        gpu_side = g_bound >= m_bound
        beyond = gpu - g_bound
        rereads = np.clip((len(subs) - 1) * self.gpu.weight_read_s()[0], 0.0, np.maximum(beyond, 0.0))
        wait = d - np.where(gpu_side, gpu, m_max)
        transfers = np.clip(wait, 0.0, chain)

        def on(mask, x):
            return np.where(mask, x, 0.0)

        losses = {"gpu_overheads": on(gpu_side, beyond - rereads), "weight_rereads": on(gpu_side, rereads),
                  "device_overheads": on(~gpu_side, m_all - m_bound), "idle_units": on(~gpu_side, m_act - m_all),
                  "imbalance": on(~gpu_side, m_max - m_act), "transfers": transfers,
                  "serialisation": wait - transfers}  # fmt: skip
        return dataclasses.replace(timing, bound=np.maximum(g_bound, m_bound), losses=losses)


    def _with_energy(self, timing: IterationTiming, subs: list[dict], whole: dict) -> IterationTiming:
        """`timing` with each step's dynamic energy (J by sched.timing.ENERGY_PARTS): the GPUs' work (every
        weight read once per sub-batch and GPU group), the bytes over the host links, the memory side's work
        (per layer, from the device) and the host's merging of partial outputs."""
        L, m = self.dep.model.n_layers, self.dep.model
        energy = self.gpu.energy(whole["tokens"], whole["sampled"], whole["flops"], whole["bytes"],
                                 passes=len(subs) * self.groups,
                                 kv_write_bytes=whole["hbm_kv_tokens"] * m.kv_bytes_per_token)  # fmt: skip
        pcie = sum(x["pcie_bytes"] for x in subs) * L * self.link_j_per_byte
        energy["pcie"] = np.asarray(pcie, float)
        for x in subs:
            for k, v in x["energy"].items():
                energy[k] = energy.get(k, 0.0) + L * v
        if self.host_merge_w:
            energy["cpu"] = energy.get("cpu", 0.0) + timing.stats["merge_host_s"] * self.host_merge_w
        steps = len(timing.durations)
        return dataclasses.replace(timing, energy={k: _per_step(v, steps) for k, v in energy.items()})


def _per_step(v, steps: int) -> np.ndarray:
    """`v` (a scalar or per-step values) as a new float array of `steps` values."""
    v = np.asarray(v, float)
    return v.copy() if v.shape == (steps,) else np.full(steps, v)


def deal(plan: Plan, groups: int) -> list[tuple[Plan, np.ndarray, np.ndarray]]:
    """`plan` dealt over `groups` GPU groups (each holds the weights; every request's KV is in a pool they share):
    prefill chunks largest first, each to the group with the fewest tokens so far, then the decodes (one token
    each, in order) to even out the groups' tokens. Per group: its plan and the indices of its decode and prefill
    requests in `plan`."""
    load = np.zeros(groups, np.int64)
    pre_group = np.zeros(len(plan.prefill_ids), np.int64)
    for i in np.argsort(-plan.prefill_chunks, kind="stable"):
        g = int(np.argmin(load))
        pre_group[i] = g
        load[g] += int(plan.prefill_chunks[i])
    # Water-fill n decodes: the lowest level h with sum(max(h - load, 0)) >= n; groups below h - 1 fill to it.
    n = len(plan.decode_ids)
    lo, hi = int(load.min()), int(load.min()) + n
    while lo < hi:
        h = (lo + hi) // 2
        if np.maximum(h - load, 0).sum() >= n:
            hi = h
        else:
            lo = h + 1
    take = np.maximum(lo - 1 - load, 0)
    extra = n - int(take.sum())  # the rest go one each to groups that reach level lo
    take[np.flatnonzero(load <= lo - 1)[:extra]] += 1
    dec_group = np.repeat(np.arange(groups), take)
    out = []
    for g in range(groups):
        d, p = np.flatnonzero(dec_group == g), np.flatnonzero(pre_group == g)
        out.append((plan.select(d, p), d, p))
    return out


class StepInterpolation:
    """The steps of a `steps`-step iteration evaluated exactly (`offsets`: both ends and every
    BULK_SAMPLE_EVERY-th step between), and values known there (first axis) linearly interpolated to every step
    0..steps-1: step k takes sample segment[k] x weight0[k] + sample segment[k] + 1 x weight[k] (the weights
    computed once for every quantity of the iteration; `step_interpolation` makes one per step count)."""

    def __init__(self, steps: int):
        self.steps = steps
        samples = 2 + (steps - 1) // BULK_SAMPLE_EVERY
        self.offsets = offsets = np.unique(np.linspace(0, steps - 1, samples).round().astype(int))
        if steps == 1:
            self.segment, self.weight0, self.weight = np.zeros(1, np.int64), np.ones(1), np.zeros(1)
            return
        k = np.arange(steps)
        self.segment = np.clip(np.searchsorted(offsets, k, side="right") - 1, 0, len(offsets) - 2)
        self.weight = (k - offsets[self.segment]) / (offsets[self.segment + 1] - offsets[self.segment])
        self.weight0 = 1 - self.weight

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.steps == 1:
            return values
        shape = (-1, *([1] * (values.ndim - 1)))
        if len(values) == 2:  # one segment: every step between the same two samples (no gathering)
            return values[0] * self.weight0.reshape(shape) + values[1] * self.weight.reshape(shape)
        i = self.segment
        return values[i] * self.weight0.reshape(shape) + values[i + 1] * self.weight.reshape(shape)


step_interpolation = functools.lru_cache(maxsize=1024)(StepInterpolation)
