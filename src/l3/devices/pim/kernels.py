"""Command streams of one decode step's attention for one layer on one rank (see docs/pim.md, "Kernels").

The rank holds some requests' KV of this layer. The stream first carries the host writes of every request
(its Q into the rank PU, the new token's K and V into the banks), then the attention kernel, request by
request and, within a request, head round by head round (a round = the G = chips / N_hc KV heads that run
side by side on the G chip groups, one all-bank command driving all of them). Per round:

1. Q of the round's query heads is written into the chips' shared buffers (PIM_WR_SB).
2. Score phase, chunk by chunk: all-bank ACT, PIM_MAC over the row's token slices (one access per tCCD_L, each
   access serving up to N_cmr query heads; more need extra passes), PRE; the rank PU reads the chunk's
   partials (PIM_RD_RB), sums the N_hc chip partials (adder) and runs the chunk softmax (exp with the chunk
   max, running max and sum). The scores stay in the rank PU's score buffer.
3. Normalisation and S write-back, chunk by chunk: the softmax unit rescales the chunk's scores to the final
   max and the rank PU writes them into the shared buffers (PIM_WR_SB).
4. Context phase, chunk by chunk: PIM_MAC multiplies each token's V slice by its broadcast score and
   accumulates per query head in the result buffer.
5. The rank PU reads the accumulators (PIM_RD_RB), sums them over banks and chips and divides by the
   softmax sum; after the request's last round the host reads the output.

Bubble-free (`features.bubble_free`): result buffers and shared buffers are double-buffered, so the bank PUs
work on chunk i+1 while the rank PU handles chunk i (internal and external buses are separate), and the next
round's Q is loaded while the current round finishes. Off: buffers are single and every unit waits for the
previous step. A chunk is what both buffers hold (whole rows where a row is smaller). When a round's scores
exceed the score buffer the context is processed in segments, each a score phase then a context phase; the
bank PU applies the segment's rescale factor (set by PIM_WR_R) to its accumulators on the next MAC.

With `features.kv_mapping` off (naive controller layout, mapping.py) no bank holds whole FP16 values, so the
bank PUs cannot compute: every K and V row stripe is streamed over the rank link (RD_AB) and the rank PU does
the dot products and the accumulation on its adder lanes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from l3.devices.pim.commands import PU, Cmd, Run
from l3.devices.pim.geometry import PimGeometry
from l3.errors import SpecError
from l3.specs.dram import DramSpec
from l3.specs.model import ModelSpec
from l3.specs.pim import PimSpec

FP16_BYTES = 2


@dataclass(frozen=True)
class KernelShape:
    """Constants of the attention kernels of one model on one rank. Bytes unless named; slots per bank."""

    n_bk: int  # banks per chip
    n_chips: int  # chips per rank
    n_hc: int  # chips per head
    n_kv_heads: int
    n_heads: int  # query heads (host Q and output sizes)
    head_dim: int  # E_h, elements
    gqa: int  # query heads per KV head
    passes: int  # ceil(gqa / N_cmr): MAC passes over each column
    cols_per_token: int  # column accesses per token slice
    tokens_per_row: int  # token slices per bank row
    chunk: int  # slots per bank handled per chunk
    segment: int  # slots per bank whose scores fit the rank PU's score buffer
    page_bytes: int
    line_bytes: int  # host burst (one rank column access)
    partial_bytes: int
    acc_bytes: int  # bytes per accumulator entry
    host_passes: int  # bus passes per host KV write: 1 in-flight re-layout, 3 host re-layout
    mapped: bool  # L3 KV mapping (bank PUs compute) or the naive layout (rank PU computes)
    serial: bool  # not bubble-free

    @classmethod
    def build(cls, dram: DramSpec, pim: PimSpec, model: ModelSpec) -> KernelShape:
        org, geo = dram.org, PimGeometry(dram, pim)
        e_h, gqa, n_bk = model.head_dim, model.gqa_group, org.banks_per_chip
        n_hc = geo.n_hc(e_h, gqa)
        slice_bytes = FP16_BYTES * e_h // n_hc
        burst = dram.burst_bytes_per_chip
        if e_h % n_hc or slice_bytes % burst or slice_bytes > org.page_bytes:
            raise SpecError(f"head_dim {e_h} over N_hc={n_hc} chips gives {slice_bytes} B per chip: it must be "
                            f"a whole number of {burst}-B bursts and fit a {org.page_bytes}-B row")  # fmt: skip
        tpr = org.page_bytes // slice_bytes
        nbuf = 1 if not pim.features.bubble_free else 2
        acc_item = 4 if pim.bank_pu.accumulate == "fp32" else 2
        pb = pim.bank_pu.partial_bytes
        acc = gqa * (e_h // n_hc) * acc_item
        q_chip = gqa * (e_h // n_hc) * FP16_BYTES
        rb_slots = (pim.bank_pu.result_buffer_bytes - acc) // (nbuf * gqa * pb)
        sb_slots = (pim.shared_buffer_bytes - q_chip) // (nbuf * n_bk * gqa * FP16_BYTES)
        if rb_slots < 1:
            raise SpecError(f"pim.bank_pu.result_buffer_bytes ({pim.bank_pu.result_buffer_bytes}) must hold the "
                            f"{acc} B of accumulators plus {nbuf} x {gqa * pb} B of score partials")  # fmt: skip
        if sb_slots < 1:
            raise SpecError(f"pim.shared_buffer_bytes ({pim.shared_buffer_bytes}) must hold Q ({q_chip} B) plus "
                            f"{nbuf} x {n_bk * gqa * FP16_BYTES} B of scores")  # fmt: skip
        chunk = min(rb_slots, sb_slots)
        chunk = chunk // tpr * tpr if chunk >= tpr else chunk
        groups = org.chips_per_rank // n_hc
        seg = pim.rank_pu.score_buffer_bytes // (n_bk * gqa * groups * FP16_BYTES)
        period = chunk * tpr // math.gcd(chunk, tpr)
        if seg < 2 * period:
            raise SpecError(f"pim.rank_pu.score_buffer_bytes ({pim.rank_pu.score_buffer_bytes}) must hold the "
                            f"scores of {2 * period * n_bk} tokens x {gqa * groups} query heads")  # fmt: skip
        return cls(
            n_bk=n_bk, n_chips=org.chips_per_rank, n_hc=n_hc, n_kv_heads=model.n_kv_heads,
            n_heads=model.n_heads, head_dim=e_h, gqa=gqa, passes=math.ceil(gqa / pim.bank_pu.gqa_reuse_max),
            cols_per_token=slice_bytes // burst, tokens_per_row=tpr, chunk=chunk, segment=seg // period * period,
            page_bytes=org.page_bytes, line_bytes=burst * org.chips_per_rank, partial_bytes=pb,
            acc_bytes=acc_item, host_passes=1 if pim.features.inflight_relayout else 3,
            mapped=pim.features.kv_mapping, serial=not pim.features.bubble_free,
        )  # fmt: skip

    @property
    def groups(self) -> int:
        """G: chip groups = KV heads processed side by side."""
        return self.n_chips // self.n_hc

    @property
    def rounds(self) -> int:
        """Head rounds per (request, layer)."""
        return -(-self.n_kv_heads // self.groups)

    @property
    def period(self) -> int:
        """Slots after which the kernel's command pattern repeats (chunks and rows both aligned)."""
        if not self.mapped:
            return self.tokens_per_row
        return self.chunk * self.tokens_per_row // math.gcd(self.chunk, self.tokens_per_row)

    def slots(self, context: int) -> int:
        """Slots per bank one head's `context` tokens occupy (the all-bank commands cover the fullest bank)."""
        return -(-context // self.n_bk)


def rank_layer_stream(shape: KernelShape, contexts: Sequence[int]) -> Iterator[Run]:
    """One layer's decode attention on one rank for requests with these context lengths (tokens, >= 1,
    including the new token), in order: all host writes, then the kernels."""
    contexts = [int(c) for c in contexts]
    if any(c < 1 for c in contexts):
        raise ValueError("contexts must be >= 1 token")
    for i, ctx in enumerate(contexts):
        yield from _host_writes(shape, i, ctx)
    rounds = [(i, r) for i in range(len(contexts)) for r in range(shape.rounds)]
    yield from (_mapped if shape.mapped else _naive)(shape, contexts, rounds)


def _host_bursts(shape: KernelShape, nbytes: int) -> int:
    return -(-nbytes // shape.line_bytes)


def _host_writes(shape: KernelShape, i: int, ctx: int) -> Iterator[Run]:
    """Q into the rank PU; the new token's K and V of every round into bank (ctx - 1) mod N_bk. Each burst
    writes one column of every chip: one 8-B piece of each of the round's G head slices."""
    yield Run(Cmd.WR, _host_bursts(shape, shape.n_heads * shape.head_dim * FP16_BYTES), PU, tag=("hq", i),
              cat="host_write")  # fmt: skip
    bank, n = (ctx - 1) % shape.n_bk, shape.cols_per_token
    for r in range(shape.rounds):
        for kv in (0, 1):
            yield Run(Cmd.ACT, 1, bank, row=(1 << 40) + 2 * (i * shape.rounds + r) + kv, cat="host_write")
            yield Run(Cmd.WR, n, bank, cat="host_write")
            if shape.host_passes == 3:  # host CPU re-layout: read the naive bytes back, permute, rewrite
                tag = ("hr", i, r, kv)
                yield Run(Cmd.RD, n, bank, tag=tag, cat="host_write")
                yield Run(Cmd.HOST_CPU, size=n * shape.line_bytes, wait=(tag,), tag=("hc", i, r, kv),
                          cat="host_write")  # fmt: skip
                yield Run(Cmd.WR, n, bank, wait=(("hc", i, r, kv),), cat="host_write")
            yield Run(Cmd.PRE, 1, bank, cat="host_write")


def _active_heads(shape: KernelShape, r: int) -> int:
    return min(shape.groups, shape.n_kv_heads - r * shape.groups)


def _rows(shape: KernelShape, row_base: int, a: int, b: int, wait: tuple, tag) -> Iterator[Run]:
    """All-bank MACs over slots [a, b) of one K or V region, row by row; `wait` on the first MAC."""
    tpr, per_slot = shape.tokens_per_row, shape.cols_per_token * shape.passes
    first, last = a // tpr, (b - 1) // tpr
    for q in range(first, last + 1):
        n = min(b, (q + 1) * tpr) - max(a, q * tpr)
        yield Run(Cmd.ACT_AB, row=row_base + q, cat="row_switch")
        yield Run(Cmd.PIM_MAC, n * per_slot, wait=wait if q == first else (), tag=tag if q == last else None)
        yield Run(Cmd.PRE_AB, cat="row_switch")


def _mapped(shape: KernelShape, contexts: list[int], rounds: list[tuple[int, int]]) -> Iterator[Run]:
    s = shape
    e_chip = s.head_dim // s.n_hc
    sc = cc = 0  # global score / context chunk counters (double-buffer dependencies cross rounds)
    for idx, (i, r) in enumerate(rounds):
        slots, g = s.slots(contexts[i]), _active_heads(s, r)
        k_base, v_base = (2 * idx) << 20, (2 * idx + 1) << 20
        if idx == 0:
            yield Run(Cmd.PIM_WR_SB, size=s.gqa * e_chip * FP16_BYTES, tag=("q", 0), wait=(("hq", i),),
                      cat="rank_transfer")  # fmt: skip
        for a in range(0, slots, s.segment):
            b = min(slots, a + s.segment)
            chunks = [(c, min(b, c + s.chunk)) for c in range(a, b, s.chunk)]
            yield Run(Cmd.PIM_WR_R, cat="compute")  # dot-product mode
            for c0, c1 in chunks:
                n = (c1 - c0) * s.n_bk
                wait = ((("rb", sc - 2),) if sc >= 2 else ()) + ((("q", idx),) if c0 == 0 else ())
                yield from _rows(s, k_base, c0, c1, wait, ("smac", sc))
                yield Run(Cmd.PIM_RD_RB, size=n * s.gqa * s.partial_bytes, wait=(("smac", sc),), tag=("rb", sc),
                          cat="bubble")  # fmt: skip
                yield Run(Cmd.RPU_SUM, size=n * s.gqa * g * s.n_hc, wait=(("rb", sc),), tag=("sum", sc),
                          cat="bubble")  # fmt: skip
                yield Run(Cmd.RPU_SOFTMAX, size=n * s.gqa * g, wait=(("sum", sc),), tag=("sm", sc), cat="bubble")
                sc += 1
            last_sm, first_cc = ("sm", sc - 1), cc
            for k, (c0, c1) in enumerate(chunks):
                n = (c1 - c0) * s.n_bk
                yield Run(Cmd.RPU_SOFTMAX, size=n * s.gqa * g, wait=(last_sm,), tag=("nm", cc), cat="bubble")
                yield Run(Cmd.PIM_WR_SB, size=n * s.gqa * FP16_BYTES, tag=("s", cc), cat="bubble",
                          wait=(("nm", cc),) + ((("cmac", cc - 2),) if cc >= 2 else ()))  # fmt: skip
                if k == len(chunks) - 1 and b == slots and idx + 1 < len(rounds):  # next round's Q, early
                    yield Run(Cmd.PIM_WR_SB, size=s.gqa * e_chip * FP16_BYTES, tag=("q", idx + 1),
                              wait=(("hq", rounds[idx + 1][0]), ("smac", sc - 1)), cat="rank_transfer")
                if k:
                    yield from _context(s, v_base, chunks[k - 1], cc - 1, cc - 1 == first_cc, idx)
                cc += 1
            yield from _context(s, v_base, chunks[-1], cc - 1, len(chunks) == 1, idx)
        yield Run(Cmd.PIM_RD_RB, size=s.n_bk * s.gqa * e_chip * s.acc_bytes, wait=(("cmac", cc - 1),),
                  tag=("acc", idx), cat="rank_transfer")  # fmt: skip
        yield Run(Cmd.RPU_SUM, size=s.n_bk * s.gqa * s.head_dim * g, wait=(("acc", idx),), tag=("asum", idx),
                  cat="rank_compute")  # fmt: skip
        yield from _finish_round(s, rounds, idx, g, wait=("asum", idx))


def _context(shape: KernelShape, v_base: int, chunk: tuple[int, int], j: int, first_of_segment: bool,
             idx: int) -> Iterator[Run]:  # fmt: skip
    """Context MACs of chunk j; the segment's first chunk sets accumulate mode and the rescale factor, and
    the round's first chunk waits until the previous round's accumulators are drained."""
    if first_of_segment:
        yield Run(Cmd.PIM_WR_R, wait=(("nm", j),), cat="compute")
    wait = (("s", j),) + ((("acc", idx - 1),) if chunk[0] == 0 and idx else ())
    yield from _rows(shape, v_base, chunk[0], chunk[1], wait, ("cmac", j))


def _finish_round(shape: KernelShape, rounds: list[tuple[int, int]], idx: int, g: int, wait) -> Iterator[Run]:
    """Divide by the softmax sum; after a request's last round the host reads its output."""
    yield Run(Cmd.RPU_SOFTMAX, size=shape.gqa * shape.head_dim * g, wait=(wait,), tag=("out", idx),
              cat="rank_compute")  # fmt: skip
    if idx + 1 == len(rounds) or rounds[idx + 1][0] != rounds[idx][0]:
        yield Run(Cmd.RD, _host_bursts(shape, shape.n_heads * shape.head_dim * FP16_BYTES), PU,
                  wait=(("out", idx),), cat="host_read")  # fmt: skip


def _naive(shape: KernelShape, contexts: list[int], rounds: list[tuple[int, int]]) -> Iterator[Run]:
    s = shape
    for idx, (i, r) in enumerate(rounds):
        slots, g = s.slots(contexts[i]), _active_heads(s, r)
        stripes = -(-slots // s.tokens_per_row)
        for kv in (0, 1):
            for q in range(stripes):
                n = (min(slots, (q + 1) * s.tokens_per_row) - q * s.tokens_per_row) * s.n_bk
                tag = ("kv", idx, kv, q)
                yield Run(Cmd.ACT_AB, row=((2 * idx + kv) << 20) + q, cat="row_switch")
                yield Run(Cmd.RD_AB, size=s.n_bk * s.page_bytes, wait=(("hq", i),), tag=tag, cat="rank_transfer")
                yield Run(Cmd.PRE_AB, wait=(tag,), cat="row_switch")
                yield Run(Cmd.RPU_SUM, size=n * s.head_dim * s.gqa * g, wait=(tag,), tag=("mac", idx, kv),
                          cat="rank_compute")  # fmt: skip
            if kv == 0:
                yield Run(Cmd.RPU_SOFTMAX, size=slots * s.n_bk * s.gqa * g, wait=(("mac", idx, 0),),
                          cat="rank_compute")  # fmt: skip
        yield from _finish_round(s, rounds, idx, g, wait=("mac", idx, 1))
