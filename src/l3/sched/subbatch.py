"""Sub-batch scheduling for systems whose memory-side device runs decode attention (L3).

Extends continuous batching with: KV placement on memory channels at admission (least-loaded channel), two
sub-batches per iteration (a decoding request keeps its sub-batch), and one of three policies:
- `alignment` (L3): predicted PIM and GPU times of each sub-batch keep the pipeline aligned: prefills are
  spread one per sub-batch; new decodes join, N at a time, the sub-batch whose PIM time is furthest below the
  other sub-batch's GPU time; when memory is full and the PIM would idle, the other sub-batch's last prefill
  chunk is shortened until its predicted GPU time matches this sub-batch's PIM time.
- `halving` (NeuPIMs-style): split by count, chunked prefill with the usual token budget.
- `fill-capacity` (naive): admit and prefill everything that fits memory at once, split by count.
Under `alignment` with `coordination.single_batch_fallback`, an iteration runs as one batch when the predictors
say two sub-batches would be slower (small batches, where the second sub-batch mostly re-reads the weights) and
the last measured time per request-step does not refute it; with two KV tiers the measurements alone decide once
each way has been measured (`_choose_one_batch`).
With `coordination.asymmetric` (NEO-style, two KV tiers: GPU HBM and the device) the split follows the KV:
sub-batch 0 holds every prefill and the requests whose KV is in HBM (attention on the GPU), sub-batch 1 those
whose KV is in the device. New requests go to HBM while it has room; under `alignment` they join the device
only while the predicted attention time of sub-batch 1, its contexts grown by as many tokens as each request has
generated so far, stays within sub-batch 0's predicted GPU time in a decode iteration (the device's attention
then hides behind the GPU's work; beyond it each added request slows every other's tokens), and while a device
sub-batch of the size the device could reach under that rule is predicted to decode more tokens per second beside
the HBM sub-batch than the HBM sub-batch alone (a second sub-batch reads the weights again); once it is not, HBM's
free room goes first to the device requests still running, which rebalancing moves in.
Predictors learn from the times the executor reports (`observe`), never from cost models.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from l3.sched.kv import DEVICE_TIER, HBM_TIER, KvPool
from l3.sched.plan import Plan
from l3.sched.policies import get_policy
from l3.sched.predictors import ErrorLog, ForestPredictor, LinearPredictor
from l3.sched.requests import RequestTable, Status, WaitingQueue
from l3.sched.scheduler import ContinuousBatchingScheduler, RepeatLimit
from l3.sched.timing import IterationTiming
from l3.specs.model import ModelSpec
from l3.specs.system import CoordinationSpec, SchedulerSpec

Spread = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]  # (placement, tokens, order=None)


def tokens_at_slot(placement: np.ndarray, tokens: np.ndarray,
                   order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The `Spread` of unsplit placement: request i's tokens[i] tokens all lie at its slot placement[i]."""
    placement, tokens = np.asarray(placement, np.int64), np.asarray(tokens, np.int64)
    keep = np.flatnonzero(tokens > 0)
    return keep, placement[keep], tokens[keep]


CHUNK_FRACTIONS = np.array([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0625])
# Run-time rebalancing: iterations between checks, and the predicted shortening of a layer a move must promise
# (our assumptions: a check costs a few predictor queries; the predictors' median error is a few per cent).
REBALANCE_EVERY = 4
REBALANCE_GAIN = 0.03
# Device sub-batch sizes weighed when deciding whether the device tier pays (our assumption: geometric steps
# resolve the best size within a factor of about 1.4 up to a thousand requests).
DEVICE_SIZES = 20


def _busiest(tokens: np.ndarray, count: np.ndarray, written: np.ndarray, total: float) -> list[float]:
    """The PIM features of decodes holding `tokens` and `count` requests per slot beside `written` prefill tokens:
    [the busiest slot's decode tokens, its requests, its tokens written, all decode tokens `total`]."""
    k = int(np.argmax(tokens + written))
    return [tokens[k], count[k], written[k], total]


def layer_time(g0: np.ndarray, g1: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """A pipelined layer's time from its sub-batches' GPU (g) and attention (p) times: at least both GPU parts,
    both attention parts, and each sub-batch's GPU part followed by its own attention."""
    return np.maximum(np.maximum(g0 + g1, p0 + p1), np.maximum(g0 + p0, g1 + p1))


def tiered_one_batch_time(g_all, g_dense, p):
    """One batch's layer time under asymmetric pipelining from its whole GPU part `g_all` (the HBM tier's
    attention included), its dense work `g_dense` (the GPU part without that attention) and the device's attention
    `p`: the two attentions run side by side after the dense work, so the longer of the GPU part and the dense work
    followed by the device's attention."""
    return np.maximum(g_all, np.minimum(g_dense, g_all) + p)


class SubBatchScheduler(ContinuousBatchingScheduler):
    def __init__(self, spec: SchedulerSpec, kv: KvPool, table: RequestTable, queue: WaitingQueue, replica: int,
                 model: ModelSpec, coord: CoordinationSpec, positions: int, spread: Spread | None = None,
                 overlap: bool = True, stripe: Callable[[np.ndarray], np.ndarray] | None = None):  # fmt: skip
        """`positions`: the placement slots; `spread(placement, tokens, order)` says which slots hold how many of
        each request's tokens ((request index, slot, tokens) triples; default: all at the request's slot);
        `overlap`: whether the executor overlaps the sub-batches (else every iteration runs as one batch);
        `stripe`: given, this scheduler decides the slot of each new chunk of a striped request among its
        stripe's slots (`stripe(placement)`, (n, D)) and records them in the table's `stripe` column."""
        super().__init__(spec, kv, table, queue, replica, model)
        self.coord, self.positions, self.overlap = coord, positions, overlap
        self.policy = get_policy(coord.policy)
        self.spread = spread or tokens_at_slot
        self.stripe = stripe
        if stripe is not None:
            table.set_stripe_width(stripe(np.zeros(1, np.int64)).shape[1])
        self.group = coord.decode_group or (1 if model.gqa_group == 1 else 16)
        self.pim_pred = LinearPredictor(coord.predictor_window)
        self.gpu_pred = ForestPredictor(coord.predictor_window, seed=replica)
        self.pim_err, self.gpu_err = ErrorLog(), ErrorLog()
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # predictions for the plan just made
        self._feats: tuple[np.ndarray, np.ndarray] | None = None  # and their (GPU, PIM) features
        self.chunked = 0  # prefill chunks shortened to close a PIM bubble
        self.single_batch = 0  # iterations run as one batch because splitting would not pay
        self._one = False  # the plan just made runs as one batch
        self._step_cost: list[float | None] = [None, None]  # last measured s per request-step: one batch, split
        self._same_way = 0  # consecutive iterations run the same way (one batch or split)
        self._last_way = -1
        self._shed = False  # the last iteration's device attention outlasted all its GPU work
        self.shed = 0  # device-tier requests preempted to relieve the device (asymmetric pipelining)
        self._until_check = 0  # iterations to the next rebalancing check
        self._migrating: dict[int, int] = {}  # request -> HBM blocks reserved for its KV moving in
        self.moved = self.promoted = 0  # decodes moved between sub-batches; of them, KV moved into HBM
        self._device_open = True  # the device tier's last verdict (`_device_pays`): it takes new requests

    @property
    def learning(self) -> bool:
        return self.policy.learns

    @property
    def warm(self) -> bool:
        return self.learning and self.gpu_pred.seen >= self.coord.warmup_iterations and self.pim_pred.w is not None

    def schedule(self, now: float) -> Plan:
        if self._shed:  # the device is the bottleneck: give up its youngest request (least work to redo)
            self._shed = False
            if (self.table.kv_tier[self.running] == DEVICE_TIER).any():
                self._preempt_last(DEVICE_TIER)
                self.shed += 1
        return super().schedule(now)

    # --- admission and placement --------------------------------------------------------------------
    def admission_budget(self) -> float:
        return self.policy.admission_budget(self.spec)

    def prefill_budget(self, decode_ids: np.ndarray) -> float:
        # Decode tokens whose attention runs on the memory side do not eat the prefill budget; those whose KV
        # is in the GPUs' HBM (asymmetric pipelining) do, as on a GPU-only system.
        on_gpu = int((self.table.kv_tier[decode_ids] == HBM_TIER).sum()) if self.coord.asymmetric else 0
        return self.policy.prefill_budget(self.spec, on_gpu)

    def choose_tier(self, rid: int) -> int | None:
        if not self.coord.asymmetric:
            return super().choose_tier(rid)
        if self._fits(rid, HBM_TIER):
            return None if self._promotion_waits() else HBM_TIER
        if not self._fits(rid, DEVICE_TIER):
            return None
        t = self.table
        run = self.running
        dev = run[t.kv_tier[run] == DEVICE_TIER]  # decoding or about to (prefilling)
        if not self.policy.learns or not len(run):
            return DEVICE_TIER  # fill by memory; and a replica with nothing to run serves the head on the device
        if not len(dev) and self.pim_pred.w is None:
            return DEVICE_TIER  # the device's time is measured once on a request of its own
        if not self.warm:
            return None
        # The device's attention of sub-batch 1 must hide behind sub-batch 0's GPU work in decode iterations
        # (prefill bursts come and go). Device contexts keep growing after admission, and output lengths are
        # unknown: each request is assumed to generate as many tokens again as it has so far.
        ids = np.append(dev, rid)
        place = np.append(t.placement[dev], 0)  # not placed yet: the least-loaded slot, or a pooled device's one
        order = t.stripe[ids]
        order[-1] = -1  # and none of its chunks' slots decided
        grown = self.pim_features(ids, ids[:0], np.empty(0), grow=t.generated[ids], place=place, order=order)
        hbm = run[t.kv_tier[run] == HBM_TIER]
        empty = np.empty(0, np.int64)
        gpu0 = self.gpu_pred.predict(self.gpu_features(empty, empty, hbm)[None, :])[0]
        if self.pim_pred.predict(grown[None, :])[0] > gpu0:
            return None
        # A device sub-batch in steady state holds a cross-section of ages, as the running batch does, each
        # grown as above.
        context = float((t.context(run) + t.generated[run]).mean())
        sizes = self._device_sizes(len(dev), context)
        gpu1 = self.gpu_pred.predict(np.array([self.gpu_features(empty, empty, np.zeros(m, np.int64), on_gpu=empty)
                                               for m in sizes]))  # decodes only, none attended on the GPU
        self._device_open = self._device_pays(len(hbm), sizes, context, gpu0, gpu1)
        return DEVICE_TIER if self._device_open else None

    def _promotion_waits(self) -> bool:
        """While the device tier does not pay, HBM's free room goes first to the device requests still running:
        new requests wait while the longest of them fits it (rebalancing, in `split`, moves it in)."""
        if self._device_open or not self.coord.rebalance:
            return False
        t = self.table
        dev = self.running[t.kv_tier[self.running] == DEVICE_TIER]
        room = self.kv.free_in(HBM_TIER) - int(self._watermark_blocks[HBM_TIER])
        return bool(len(dev)) and int(self.kv.blocks(t.context(dev).max())) <= room

    def _device_sizes(self, n_device: int, context: float) -> np.ndarray:
        """Sizes the device sub-batch could grow to, geometrically spaced from one request to as many as the
        device's free room holds at `context` tokens a request (preemptions refill the queue, so its length
        now does not bound them)."""
        room = self.kv.free_in(DEVICE_TIER) * self.kv.block_size / max(1.0, context)
        most = max(1, n_device + int(room))
        return np.unique(np.geomspace(1, most, DEVICE_SIZES).astype(np.int64))

    def _device_pays(self, n_hbm: int, sizes: np.ndarray, context: float, gpu0: float, gpu1: np.ndarray) -> bool:
        """Whether a device sub-batch, at the best of `sizes` whose attention hides behind the HBM sub-batch's GPU
        time `gpu0` (as admission requires), decodes more tokens per second than the HBM sub-batch alone. A
        second sub-batch pays its own weight reads and kernel latencies (`gpu1`, predicted at each size) and its
        attention (predicted for that many requests of `context` tokens spread evenly over the slots), so a
        device tier that can only hold a small batch beside a large HBM one lowers the rate: it stays closed,
        and the queue waits for HBM as on a GPU-only system."""
        if not n_hbm:
            return True
        ctx = np.full(int(sizes[-1]), context)
        pim = self.pim_pred.predict(self._attention_rows(ctx, np.arange(len(ctx)) % self.positions,
                                                         np.zeros(self.positions), sizes))  # fmt: skip
        hides = pim <= gpu0
        rate = (n_hbm + sizes[hides]) / layer_time(gpu0, gpu1[hides], 0.0, pim[hides])
        return bool(len(rate) and rate.max() > n_hbm / gpu0)

    def on_admit(self, ids: np.ndarray) -> None:
        """Place each new request on the least-loaded slot, by tokens held now (output lengths are unknown)."""
        t = self.table
        run = self.running
        load = self._slot_tokens(t.placement[run], t.context(run), t.stripe[run])
        t.stripe[ids] = -1  # a new layout (after a preemption too): each chunk's slot decided when first written
        for rid in ids:  # a handful per iteration
            pos = int(np.argmin(load))
            t.placement[rid] = pos
            load += self._slot_tokens(np.array([pos]), t.prefill_target[rid : rid + 1])

    def _slot_tokens(self, placement: np.ndarray, tokens: np.ndarray,
                     order: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        _, slot, held = self.spread(placement, tokens, order)
        return np.bincount(slot, weights=held, minlength=self.positions).astype(float)

    def _place_chunks(self, ids: np.ndarray, tokens: np.ndarray) -> None:
        """Decide the slots of the stripe positions that memory-side requests `ids` need to hold `tokens` tokens
        each: every new position takes the slot of the request's stripe not yet holding it with the least
        predicted work: each running request's positions counted at their whole chunks (a partly filled chunk
        will fill; a decided one not yet written will be), plus, per request a slot serves, the tokens whose time
        the PIM predictor equates with a request's own cost (its coefficients' ratio; none before it is trained).
        Ties go to the earlier slot in rotation order."""
        t, K = self.table, self.coord.chunk_tokens
        on = self._device_mask(ids)
        ids, need = ids[on], np.minimum(t.stripe.shape[1], -(-np.asarray(tokens, np.int64)[on] // K))
        have = (t.stripe[ids] >= 0).sum(axis=1)
        todo = np.flatnonzero(need > have)
        if not len(todo):
            return
        dev = self._on_device(self.running)
        decided = (t.stripe[dev] >= 0).sum(axis=1) * K  # slots decided ahead of the tokens count already
        _, slot, held = self.spread(t.placement[dev], np.maximum(t.context(dev), decided), t.stripe[dev])
        w = self.pim_pred.w
        per_request = w[1] / w[0] if w is not None and w[0] > 0 and w[1] > 0 else 0.0
        cost = np.bincount(slot, -(-held // K) * K + per_request, minlength=self.positions).astype(float)
        for i in todo:
            rid = ids[i]
            domain = self.stripe(t.placement[rid : rid + 1])[0]
            for j in range(have[i], need[i]):
                free = domain[~np.isin(domain, t.stripe[rid, :j])]
                t.stripe[rid, j] = s = free[np.argmin(cost[free])]
                cost[s] += K + per_request

    # --- features -------------------------------------------------------------------------------------
    def pim_features(self, ids: np.ndarray, pre_ids: np.ndarray, pre_tokens: np.ndarray, grow: int = 0,
                     place: np.ndarray | None = None, order: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """[busiest slot's decode tokens, its requests, its prefill tokens written, all decode tokens]: requests
        sharing a slot share a rank in every layer, so the busiest slot sets each layer's attention time. `place`,
        `order`: the requests' slots and decided stripe slots (default: the table's)."""
        t = self.table
        if place is None:
            place, order = t.placement[ids], t.stripe[ids]
        written = self._slot_tokens(t.placement[pre_ids], pre_tokens, t.stripe[pre_ids])
        return self._attention_row(t.context(ids) + grow, place, written, order)

    def _attention_row(self, ctx: np.ndarray, place: np.ndarray, written: np.ndarray,
                       order: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """`pim_features` of decodes with contexts `ctx` at slots `place` (decided stripe slots `order`), beside
        `written` prefill tokens per slot."""
        _, slot, held = self.spread(place, ctx, order)
        tokens = np.bincount(slot, weights=held, minlength=self.positions)
        return np.array(_busiest(tokens, np.bincount(slot, minlength=self.positions), written, ctx.sum()), float)

    def _attention_rows(self, ctx: np.ndarray, place: np.ndarray, written: np.ndarray, ends) -> np.ndarray:
        """`_attention_row` of the first m decodes for each m of `ends` (ascending), from one spread of them all
        (a request's slots depend on it alone), the slots' tokens and requests summed prefix by prefix."""
        req, slot, held = self.spread(place, ctx)
        order = np.argsort(req, kind="stable")
        req, slot, held = req[order], slot[order], held[order]
        tokens, count = np.zeros(self.positions), np.zeros(self.positions, np.int64)
        rows, start = [], 0
        for m, cut in zip(ends, np.searchsorted(req, ends), strict=True):
            tokens += np.bincount(slot[start:cut], weights=held[start:cut], minlength=self.positions)
            count += np.bincount(slot[start:cut], minlength=self.positions)
            start = cut
            rows.append(_busiest(tokens, count, written, ctx[:m].sum()))
        return np.array(rows, float)

    def _device_mask(self, ids: np.ndarray) -> np.ndarray:
        """Which of these requests attend on the memory-side device: all, but those whose KV is in HBM."""
        if not self.coord.asymmetric:
            return np.ones(len(ids), bool)
        return self.table.kv_tier[ids] == DEVICE_TIER

    def _on_device(self, decode_ids: np.ndarray) -> np.ndarray:
        """The decodes whose attention runs on the memory side (under asymmetric pipelining, not the HBM tier's)."""
        return decode_ids[self._device_mask(decode_ids)] if self.coord.asymmetric else decode_ids

    def gpu_features(self, chunks: np.ndarray, prefix: np.ndarray, decode_ids: np.ndarray,
                     on_gpu: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """[prefill chunk tokens, their prefix tokens, decode requests] and, under asymmetric pipelining, the
        tokens the GPU attends for the decodes whose KV is in HBM (or for `on_gpu`, where given)."""
        base = [chunks.sum(), prefix.sum(), len(decode_ids)]
        if not self.coord.asymmetric:
            return np.array(base, float)
        t = self.table
        on_gpu = decode_ids[t.kv_tier[decode_ids] == HBM_TIER] if on_gpu is None else on_gpu
        return np.array([*base, t.context(on_gpu).sum()], float)

    # --- the split ------------------------------------------------------------------------------------
    def split(self, plan: Plan) -> Plan:
        t = self.table
        if self.stripe is not None:  # the slots of the chunks this iteration writes, before anything is predicted
            self._place_chunks(plan.decode_ids, t.context(plan.decode_ids))
            self._place_chunks(plan.prefill_ids, plan.prefill_prefix + plan.prefill_chunks)
        plan.decode_on_device = self._device_mask(plan.decode_ids)
        plan.prefill_on_device = self._device_mask(plan.prefill_ids)
        if not self.overlap:  # the executor runs sub-batches one after the other: a split would only cost
            plan.decode_sub = np.zeros(len(plan.decode_ids), np.int8)
            plan.prefill_sub = np.zeros(len(plan.prefill_ids), np.int8)
            self._one = True
            self.single_batch += 1
            self._last = self._predict(plan) if self.learning else None
            return plan
        if self.coord.asymmetric:
            plan.decode_sub = plan.decode_on_device.astype(np.int8)
            plan.prefill_sub = np.zeros(len(plan.prefill_ids), np.int8)
            self._last = self._predict(plan) if self.learning else None
            if (plan.decode_sub == 1).any():
                if self.warm and self.coord.rebalance and (not len(self.queue) or not self._device_open):
                    self._rebalance(plan)
                self._one_batch_if_it_pays(plan)
            return plan
        pre_sub = np.arange(len(plan.prefill_ids), dtype=np.int8) % 2  # one prefill per sub-batch, alternating
        d = plan.decode_ids
        sub = t.sub_batch[d]
        new = np.flatnonzero(sub < 0)
        if len(new):
            if self.warm:
                self._place_aligned(plan, pre_sub, sub, new)
            else:
                counts = np.bincount(sub[sub >= 0], minlength=2)
                for i in new:  # balance by count
                    x = int(np.argmin(counts))
                    sub[i] = x
                    counts[x] += 1
            t.sub_batch[d[new]] = sub[new]
        plan.decode_sub, plan.prefill_sub = sub.astype(np.int8), pre_sub
        # The plan's predictions, made once: the choices below read them, and they are kept for `observe`
        # unless a choice changes the plan.
        self._last = self._predict(plan) if self.learning else None
        if self.warm and self.coord.rebalance:
            self._rebalance(plan)
        if not self._one_batch_if_it_pays(plan) and self.warm and len(plan.prefill_ids) and len(self.queue) \
                and not self._head_fits():  # fmt: skip
            if self._chunk_to_align(plan):
                self._last = self._predict(plan)
        return plan

    def _one_batch_if_it_pays(self, plan: Plan) -> bool:
        """Run `plan` as one batch (everything in sub-batch 0) where `_choose_one_batch` says so."""
        self._one = self.warm and self.coord.single_batch_fallback and self._choose_one_batch(plan)
        if self._one:
            split = plan.decode_sub.any() or plan.prefill_sub.any()
            plan.decode_sub, plan.prefill_sub = np.zeros_like(plan.decode_sub), np.zeros_like(plan.prefill_sub)
            self.single_batch += 1
            if split:  # the predictions made for the split no longer describe the plan
                self._last = self._predict(plan)
        return self._one

    def _decides_the_way(self, plan: Plan) -> bool:
        """Whether `plan`'s time per request-step measures the way it ran (one batch or split). Under asymmetric
        pipelining only a decode-only plan with device decodes does: without device decodes there was nothing to
        split, and a prefill's prompt work would count against the way that happened to carry it."""
        return not self.coord.asymmetric or (not len(plan.prefill_ids) and bool(plan.decode_on_device.any()))

    def _predict(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """(GPU, PIM) predicted seconds of both sub-batches of `plan` (NaN before the predictors are trained)."""
        gx, px = [], []
        for x in (0, 1):
            sb = plan.sub_batch(x)
            gx.append(self.gpu_features(sb.prefill_chunks, sb.prefill_prefix, sb.decode_ids))
            px.append(self.pim_features(self._on_device(sb.decode_ids), sb.prefill_ids, sb.prefill_chunks))
        self._feats = np.array(gx), np.array(px)  # what `observe` learns from once the plan has run
        return self.gpu_pred.predict(self._feats[0]), self.pim_pred.predict(self._feats[1])

    def _choose_one_batch(self, plan: Plan) -> bool:
        """One batch when the predictors favour it and measurements do not refute it. The forest cannot tell
        sub-batch GPU times well after a run of one-batch iterations (it has seen only whole batches), so the
        last measured time per request-step of each way decides; every `warmup_iterations` iterations in one
        way, the other is tried once to refresh its measurement. Under asymmetric pipelining the measurements
        decide both ways, the predictors only until each way has been measured: one batch there runs dense work
        without any GPU attention at the size of the whole batch, a point the forest has never seen (it learns
        sub-batch 0 with the HBM tier's attention and the smaller sub-batch 1 without), and its guess misses the
        measured step by 20-50% (Qwen-72B at TP8: 75-94 ms predicted, 62 ms measured)."""
        one, split = self._step_cost
        if split is None:
            return False  # measure a split iteration first
        if one is None:
            return self._one_batch_pays(plan)
        stale = self._same_way >= self.coord.warmup_iterations
        if self.coord.asymmetric:
            return not self._one if stale else one <= split
        if stale and self._one:
            return False  # refresh the split measurement
        if not stale and one > split:
            return False  # one batch measured slower
        return self._one_batch_pays(plan)  # predictions last: the whole batch's costs a forest query

    def _one_batch_pays(self, plan: Plan) -> bool:
        """Whether one batch is predicted faster than two sub-batches. Two sub-batches take, per layer, at least
        the longest of: both GPU parts, both attention parts, and each sub-batch's GPU part + its own attention;
        one batch takes its GPU part (the weights read once) + all the attention. Under asymmetric pipelining the
        GPU part includes the HBM tier's attention, which runs beside the device's: one batch takes its dense work
        (its GPU part without that attention) + the device's attention, or its whole GPU part if longer."""
        (g0, g1), (p0, p1) = self._last  # the split plan's
        feats = self.gpu_features(plan.prefill_chunks, plan.prefill_prefix, plan.decode_ids)
        rows = [feats]
        if self.coord.asymmetric:
            rows.append(np.append(feats[:-1], 0.0))  # no decode attended on the GPU
        pred = self.gpu_pred.predict(np.array(rows))
        # The whole batch does at least each part's GPU work (a forest does not extrapolate to larger batches).
        g_all = max(pred[0], g0, g1)
        if self.coord.asymmetric:  # its dense work at least sub-batch 1's (decodes only, none on the GPU)
            one = tiered_one_batch_time(g_all, max(pred[1], g1), p0 + p1)
        else:
            one = g_all + p0 + p1
        return bool(one < max(g0 + g1, p0 + p1, g0 + p0, g1 + p1))

    def _place_aligned(self, plan: Plan, pre_sub: np.ndarray, sub: np.ndarray, new: np.ndarray) -> None:
        """Place new decodes, N at a time, where predicted PIM time has most room under the other's GPU time."""
        d = plan.decode_ids
        for g0 in range(0, len(new), self.group):
            grp = new[g0 : g0 + self.group]
            gpu_rows, pim_rows = [], []
            for x in (0, 1):
                members = np.concatenate([np.flatnonzero(sub == x), grp])
                p_sel = pre_sub == x
                pim_rows.append(self.pim_features(d[members], plan.prefill_ids[p_sel], plan.prefill_chunks[p_sel]))
                o_sel = pre_sub == 1 - x
                gpu_rows.append(self.gpu_features(plan.prefill_chunks[o_sel], plan.prefill_prefix[o_sel],
                                                  d[sub == 1 - x]))  # fmt: skip
            pim = self.pim_pred.predict(np.array(pim_rows))
            gpu_other = self.gpu_pred.predict(np.array(gpu_rows))
            slack = gpu_other - pim
            sub[grp] = int(np.argmax(slack))

    def _chunk_to_align(self, plan: Plan) -> bool:
        """Memory is full: where sub-batch x's PIM time is below the other's GPU time, shorten the other's last
        prefill chunk so its GPU time matches (the PIM would otherwise idle). Returns whether a chunk changed."""
        gpu, pim = self._last  # the plan's, before any change
        changed = False
        for x in (0, 1):
            o = 1 - x
            idx = np.flatnonzero(plan.prefill_sub == o)
            if not len(idx) or not pim[x] < gpu[o]:
                continue
            last = idx[-1]
            c0 = int(plan.prefill_chunks[last])
            cands = np.maximum((c0 * CHUNK_FRACTIONS).astype(np.int64) // self.kv.block_size * self.kv.block_size,
                               min(c0, self.kv.block_size))  # fmt: skip
            rows = []
            for c in cands:
                chunks = plan.prefill_chunks[idx].copy()
                chunks[-1] = c
                rows.append(self.gpu_features(chunks, plan.prefill_prefix[idx], plan.decode_ids[plan.decode_sub == o]))
            pred = self.gpu_pred.predict(np.array(rows))
            ok = np.flatnonzero(pred <= pim[x])
            c = int(cands[ok[0]] if len(ok) else cands[-1])
            if c < c0:
                plan.prefill_chunks[last] = c
                plan.prefill_completes[last] = plan.prefill_prefix[last] + c >= self.table.prefill_target[
                    plan.prefill_ids[last]]
                self.chunked += 1
                changed = True
        return changed

    # --- run-time rebalancing ----------------------------------------------------------------------------
    def _rebalance(self, plan: Plan) -> None:
        """Every REBALANCE_EVERY iterations, in a decode-only iteration, move the k longest decodes of one
        sub-batch to the other, for the k (1, 2, 4, ... up to half the sub-batch, or all of it into HBM) the
        predictors say shortens a layer most, if by REBALANCE_GAIN. Without an HBM tier the source is the sub-batch
        whose GPU part + own attention is the longer, when that chain sets the layer's time; with the tier it is
        the device tier, and the moved requests' KV must fit HBM's free room (which the caller checks nobody
        waits for): it crosses the host links during this iteration."""
        if self._until_check > 0:
            self._until_check -= 1
            return
        if len(plan.prefill_ids):
            return  # prefill chunks come and go; a move is for the steady decode pipeline
        self._until_check = REBALANCE_EVERY - 1
        t = self.table
        (g0, g1), (p0, p1) = self._last
        src = 1 if self.coord.asymmetric else int(g1 + p1 > g0 + p0)
        if not self.coord.asymmetric and max(g0 + p0, g1 + p1) <= (1 + REBALANCE_GAIN) * max(g0 + g1, p0 + p1):
            return  # neither sub-batch's GPU part + own attention sets the layer's time: moves cannot shorten it
        mine = np.flatnonzero(plan.decode_sub == src)
        order = mine[np.argsort(-t.context(plan.decode_ids[mine]), kind="stable")]
        if self.coord.asymmetric:
            need = np.cumsum(self.kv.blocks(t.context(plan.decode_ids[order])))
            hbm = plan.decode_ids[t.kv_tier[plan.decode_ids] == HBM_TIER]
            # HBM's free room less its decodes' next tokens (allocated when this iteration commits)
            room = self.kv.free_in(HBM_TIER) - int(self._watermark_blocks[HBM_TIER]) \
                - int(self._decode_growth_blocks(hbm).sum())  # fmt: skip
            most = int(np.searchsorted(need, room, side="right"))
        else:
            most = len(order) // 2
        if most < 1:
            return
        ks = np.unique(np.append(2 ** np.arange(int(np.log2(most)) + 1), most))
        gpu_rows, pim_rows, empty = [], [], []
        for k in ks:
            sub = plan.decode_sub.copy()
            sub[order[:k]] = 1 - src
            for x in (0, 1):
                dec, pre = plan.decode_ids[sub == x], plan.prefill_sub == x
                gpu_on = np.concatenate([plan.decode_ids[(plan.decode_sub == 0) & (sub == 0)],
                                         plan.decode_ids[order[:k]]]) if self.coord.asymmetric and x == 0 else None
                gpu_rows.append(self.gpu_features(plan.prefill_chunks[pre], plan.prefill_prefix[pre], dec, gpu_on))
                dev = dec[t.kv_tier[dec] == DEVICE_TIER] if self.coord.asymmetric else dec
                if self.coord.asymmetric and x == 0:
                    dev = np.setdiff1d(dev, plan.decode_ids[order[:k]])
                pim_rows.append(self.pim_features(dev, plan.prefill_ids[pre], plan.prefill_chunks[pre]))
                empty.append(not len(dec) and not pre.any())
        keep = ~np.array(empty)
        g = np.where(keep, self.gpu_pred.predict(np.array(gpu_rows)), 0.0).reshape(-1, 2)
        p = np.where(keep, self.pim_pred.predict(np.array(pim_rows)), 0.0).reshape(-1, 2)
        after = layer_time(g[:, 0], g[:, 1], p[:, 0], p[:, 1])
        best = int(np.argmin(after))
        if not after[best] < (1 - REBALANCE_GAIN) * float(layer_time(g0, g1, p0, p1)):
            return
        moved = order[: ks[best]]
        self.moved += len(moved)
        if self.coord.asymmetric:  # the KV moves during this iteration; the requests attend from HBM after it
            for rid in plan.decode_ids[moved]:
                blocks = int(self.kv.blocks(t.context(np.array([rid])))[0])
                self.kv.allocate(blocks, HBM_TIER)
                self._migrating[int(rid)] = blocks
            plan.migrate_ids = plan.decode_ids[moved]
            self.promoted += len(moved)
        else:
            plan.decode_sub[moved] = 1 - src
            t.sub_batch[plan.decode_ids[moved]] = 1 - src
            self._last = self._predict(plan)

    def repeat_limit(self, plan: Plan) -> RepeatLimit:
        if len(plan.migrate_ids):
            return RepeatLimit(1, False)  # KV on the move: the next iteration attends it from HBM
        limit = super().repeat_limit(plan)
        if self.stripe is not None:  # the chunks the repeated steps write
            self._place_chunks(plan.decode_ids, self.table.context(plan.decode_ids) + limit.steps - 1)
        return limit

    def commit(self, plan: Plan, end_s: float) -> np.ndarray:
        finished = super().commit(plan, end_s)
        t = self.table
        for rid in plan.migrate_ids:
            blocks = self._migrating.pop(int(rid))
            if t.status[rid] == Status.DONE:  # finished while its KV moved: the room in HBM is not needed
                self.kv.free(blocks, HBM_TIER)
                continue
            self.kv.free(int(t.kv_blocks[rid]), DEVICE_TIER)
            t.kv_tier[rid] = HBM_TIER
        return finished

    # --- learning ------------------------------------------------------------------------------------
    def observe(self, plan: Plan, timing: IterationTiming) -> None:
        if not self.learning or timing.sub_gpu_s is None:
            return
        if self.warm and plan.batch_size and self._decides_the_way(plan):
            way = 0 if self._one else 1
            self._same_way = self._same_way + 1 if self._last_way == way else 1
            self._last_way = way
            self._step_cost[way] = float(timing.durations[-1]) / plan.batch_size
        warm = self.warm
        if warm and self.coord.asymmetric:
            # Device contexts grow after admission: when sub-batch 1's attention outlasts both sub-batches'
            # GPU work, the GPU idles every step, and one device request is shed before the next iteration.
            self._shed = bool(timing.sub_mem_s[-1, 1] > timing.sub_gpu_s[-1].sum())
        for x in (0, 1):
            sb = plan.sub_batch(x)
            if sb.empty:
                continue
            dec = self._on_device(sb.decode_ids)
            on_device = len(dec) > 0
            if warm and self._last is not None:
                self.gpu_err.add(float(self._last[0][x]), float(timing.sub_gpu_s[0, x]))
                if on_device:
                    self.pim_err.add(float(self._last[1][x]), float(timing.sub_mem_s[0, x]))
            # The plan's features as `_predict` made them (the table has not changed since), else anew.
            gx, px = self._feats if self._last is not None else (None, None)
            self.gpu_pred.add(gx[x] if gx is not None else self.gpu_features(sb.prefill_chunks, sb.prefill_prefix,
                                                                              sb.decode_ids), timing.sub_gpu_s[0, x])
            if on_device:
                feats = px[x] if px is not None else self.pim_features(dec, sb.prefill_ids, sb.prefill_chunks)
                self.pim_pred.add(feats, timing.sub_mem_s[0, x])
                if plan.steps > 1:
                    last = self.pim_features(dec, sb.prefill_ids, sb.prefill_chunks, plan.steps - 1)
                    self.pim_pred.add(last, timing.sub_mem_s[-1, x])

    def keep_recent(self, window: int) -> None:
        self.pim_err.keep_last(window)
        self.gpu_err.keep_last(window)

    def cap_learning_time(self, share: float) -> None:
        self.gpu_pred.cap_refit_time(share)  # the forest's refits (~10 ms each); a least-squares fit is far cheaper

    def report(self) -> dict:
        return {"policy": self.coord.policy, "pim_predictor_error": self.pim_err.summary(),
                "gpu_predictor_error": self.gpu_err.summary(), "prefill_chunks_shortened": self.chunked,
                "single_batch_iterations": self.single_batch, "device_requests_shed": self.shed,
                "decodes_moved": self.moved, "decodes_moved_into_hbm": self.promoted}
