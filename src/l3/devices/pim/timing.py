"""Command-level timing engine: schedules a run-length command stream on one rank of a DIMM-PIM channel.

Units, each serving its commands in stream order at the earliest legal time (commands of different units
overlap; a run may `wait` for tagged runs of any unit):
- bank side: the rank's DDR command bus (one command per cycle), its banks and the bank PUs. Rules (all in
  command-clock cycles): ACT waits tRP after the bank's PRE and tRC after its previous ACT, tRRD_S/L after
  the rank's previous ACT (same bank group: _L) and tFAW after the fourth-last ACT; column commands wait tRCD
  after ACT and tCCD_S/L after the previous column command (an all-bank command spans every bank group, so
  _L applies), reads wait tWTR_S/L after write data, host writes wait tRTW (CL + BL/2 + 2 - CWL) after a host
  read; PRE waits tRAS after ACT, tRTP after the last read and tWR after write data. An all-bank ACT is one
  activation for tRRD/tFAW when `pim.all_bank_act` is "ganged", else N_bk single ACTs, the first-ready bank
  first (ties in bank-group-interleaved order).
  PIM_MAC and PIM_LD_SB are all-bank column reads (one per tCCD_L). Host reads / writes put a burst on the
  channel data bus CL / CWL after the command.
- refresh: when a bank command becomes ready at or after the next due time (first due tREFI / 2 after the
  start, then every tREFI), open banks are precharged (honouring tRAS/tRTP/tWR), REF blocks the rank for
  tRFC, and rows a pending column command needs are re-opened; due refreshes are executed back to back.
- the rank-PU link (PIM_RD_RB, PIM_WR_SB, RD_AB): each chip has a lane of B_rk / chips_per_rank; a command
  moving `size` bytes per chip takes ceil(size / lane bytes per cycle) cycles.
- the rank PU's adder (RPU_SUM) and softmax unit (RPU_SOFTMAX): ceil(size / lanes) rank-PU cycles each.
- the channel data bus for host reads / writes of the rank PU window: one burst per command.

The engine also counts what energy is charged on (`COUNTS`, see energy.py): bank activations (refresh re-opens
included), column bursts per chip of host reads and writes to banks and to the rank PU window, all-bank column
accesses (bank x command) of the PUs, bytes over the rank link, rank-PU operations and host re-layout bytes.

Runs of identical commands are scheduled in closed form between refreshes; `expand`ed streams give the same
answer. The breakdown charges the bank side's timeline: command occupancy (column commands: their spacing) to
the run's category, idle gaps to the binding constraint (DRAM rule -> row_switch, write turnaround ->
host_write, refresh -> refresh, a wait -> the category of the run waited for), and the tail after the last
bank command to the commands completing in it (each stretch between completions to the command ending it;
a run of `count` commands completes `count` times, at its commands' own completions, so it is charged exactly
as its expanded form). Categories sum to the total.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from l3.devices.pim.commands import ALL, BANK_CMDS, LINK_CMDS, PU, Cmd, Run
from l3.devices.pim.geometry import PimGeometry
from l3.specs.dram import DramSpec
from l3.specs.pim import PimSpec

CATEGORIES = ("compute", "row_switch", "refresh", "bubble", "rank_transfer", "rank_compute", "host_write",
              "host_read")  # fmt: skip
# What the engine counts for energy, per rank: bank ACTs; host column bursts to banks (read, write) and to the
# rank PU window (pu_read, pu_write); all-bank column accesses of the bank PUs (mac: PIM_MAC, load: PIM_LD_SB,
# stream: RD_AB's column reads) counted per bank; rank-link bytes per chip; rank-PU adds and softmax values; host
# CPU re-layout bytes.
COUNTS = ("act", "read", "write", "pu_read", "pu_write", "mac", "load", "stream", "link_bytes", "rpu_add",
          "rpu_softmax", "host_bytes")  # fmt: skip
_NEVER = -(10**12)
_COLUMN_READS = (Cmd.PIM_MAC, Cmd.PIM_LD_SB, Cmd.RD)


@dataclass(frozen=True)
class EngineResult:
    cycles: int  # total, command-clock cycles
    tck_ns: float
    breakdown: dict[str, int]  # cycles per category (CATEGORIES), summing to `cycles`
    refreshes: int
    bank_cycles: int  # end of the bank side's last command (the rest is the rank-side / host tail)
    counts: dict[str, float]  # COUNTS: what energy is charged on

    @property
    def seconds(self) -> float:
        return self.cycles * self.tck_ns * 1e-9

    def breakdown_s(self) -> dict[str, float]:
        return {k: v * self.tck_ns * 1e-9 for k, v in self.breakdown.items()}


class RankEngine:
    """Schedules streams on one rank. `refresh=False` drops refresh (used to separate its cost)."""

    def __init__(self, dram: DramSpec, pim: PimSpec, refresh: bool = True):
        t, org = dram.timing, dram.org
        self.t = t
        self.nbk = org.banks_per_chip
        self.bg = [b // org.banks_per_group for b in range(self.nbk)]
        self.act_order = [g * org.banks_per_group + k for k in range(org.banks_per_group)
                          for g in range(org.bank_groups)]  # fmt: skip
        lane_bw = PimGeometry(dram, pim).rank_link_bw / org.chips_per_rank
        self.lane_bytes_per_cycle = lane_bw * t.tck_ns * 1e-9
        self.rpu_cycles_per_cycle = pim.rank_pu.clock_ghz * t.tck_ns
        self.lanes = {Cmd.RPU_SUM: pim.rank_pu.adder_lanes, Cmd.RPU_SOFTMAX: pim.rank_pu.softmax_lanes}
        self.cpu_bytes_per_cycle = pim.host_relayout_bw / org.ranks * t.tck_ns * 1e-9  # this rank's share
        self.staggered = pim.all_bank_act == "staggered"
        self.burst_bytes = dram.burst_bytes_per_chip
        self.refresh = refresh
        self.rtw = t.cl + t.burst_cycles + 2 - t.cwl
        self.wr_gap = t.ccd_l_wr or t.ccd_l
        # an all-bank column read holds a data path shared by a bank group for banks-per-group accesses
        self.all_col = t.ccd_l * (org.banks_per_group if pim.bank_pu.data_path == "bank_group" else 1)

    # --- durations of non-bank commands --------------------------------------------------------
    def duration(self, r: Run) -> int:
        """Cycles one command of run `r` holds its (non-bank) unit."""
        if r.cmd in LINK_CMDS:
            return max(1, math.ceil(r.size / self.lane_bytes_per_cycle - 1e-9))
        if r.cmd in self.lanes:
            return max(1, math.ceil(math.ceil(r.size / self.lanes[r.cmd]) / self.rpu_cycles_per_cycle - 1e-9))
        if r.cmd == Cmd.HOST_CPU:
            return max(1, math.ceil(r.size / self.cpu_bytes_per_cycle - 1e-9))
        return self.t.burst_cycles  # channel burst to / from the rank PU window

    # --- public entry ----------------------------------------------------------------------------
    def run(self, stream: Iterable[Run], serial: bool = False) -> EngineResult:
        """Schedule `stream`. `serial`: every run also waits for the previous run when the unit changes
        (no overlap between units: the non-bubble-free kernel)."""
        self._reset()
        prev_unit, prev_done = None, (0, "bubble")
        for r in stream:
            self._count(r)
            unit = self._unit(r)
            dep_t, dep_cat = 0, r.cat
            for w in r.wait:
                try:
                    wt, wc = self.tags[w]
                except KeyError:
                    raise ValueError(f"run {r.cmd.name} waits for unknown tag {w!r}") from None
                if wt > dep_t:
                    dep_t, dep_cat = wt, wc
            if serial and prev_unit is not None and unit != prev_unit and prev_done[0] > dep_t:
                dep_t, dep_cat = prev_done
            if unit == "bank":
                done = self._bank(r, dep_t, dep_cat)  # notes its commands' completions itself
            else:
                start, d = max(self.unit_free.get(unit, 0), dep_t), self.duration(r)
                done = start + r.count * d
                self.unit_free[unit] = done
                if unit == "channel":
                    self.chan_t = done
                self._note(start + d, d, r.count, r.cat)  # command k completes at start + k * d
            if r.tag is not None:
                self.tags[r.tag] = (done, r.cat)
            prev_unit, prev_done = unit, (done, r.cat)
        return self._finish()

    # --- state -------------------------------------------------------------------------------------
    def _reset(self) -> None:
        n = self.nbk
        self.open_row = [-1] * n
        self.t_act = [_NEVER] * n
        self.t_pre = [_NEVER] * n
        self.t_rd = [_NEVER] * n
        self.t_wr_end = [_NEVER] * n
        self.faw: deque[int] = deque(maxlen=4)
        self.last_act, self.last_act_bg = _NEVER, -1
        self.last_col, self.last_col_bg, self.last_col_wr = _NEVER, -1, False
        self.last_col_all = False  # the last column command was an all-bank read (it holds the paths all_col)
        self.last_rd = _NEVER  # last host read command (tRTW)
        self.last_wr_end, self.last_wr_bg = _NEVER, -1
        self.last_issue = -1
        self.chan_t = 0
        self.next_due = self.t.refi // 2
        self.refreshes = 0
        self.counts = dict.fromkeys(COUNTS, 0.0)
        self.unit_free: dict[str, int] = {}
        self.tags: dict = {}
        self.cur = 0  # bank-side timeline charged so far
        self.bd = dict.fromkeys(CATEGORIES, 0)
        # completions that may lie after `cur`, as progressions (first, step, count, category): the
        # completions of `count` commands of one run at first, first + step, ...
        self.pending: list[tuple[int, int, int, str]] = []
        self.end = 0

    def _count(self, r: Run) -> None:
        """Add run `r` to the energy counts (activations are counted as they are committed)."""
        c, k = self.counts, r.count
        if r.cmd in (Cmd.RD, Cmd.WR):
            c[("pu_" if r.bank == PU else "") + ("read" if r.cmd == Cmd.RD else "write")] += k
        elif r.cmd in (Cmd.PIM_MAC, Cmd.PIM_LD_SB):
            c["mac" if r.cmd == Cmd.PIM_MAC else "load"] += k * self.nbk
        elif r.cmd in LINK_CMDS:
            c["link_bytes"] += k * r.size
            if r.cmd == Cmd.RD_AB:  # the open rows stream out one column access after another
                c["stream"] += k * r.size / self.burst_bytes
        elif r.cmd == Cmd.RPU_SUM:
            c["rpu_add"] += k * r.size
        elif r.cmd == Cmd.RPU_SOFTMAX:
            c["rpu_softmax"] += k * r.size
        elif r.cmd == Cmd.HOST_CPU:
            c["host_bytes"] += k * r.size

    @staticmethod
    def _unit(r: Run) -> str:
        if r.cmd in BANK_CMDS or (r.cmd in (Cmd.RD, Cmd.WR) and r.bank != PU):
            return "bank"
        if r.cmd in LINK_CMDS:
            return "link"
        if r.cmd == Cmd.RPU_SUM:
            return "adder"
        if r.cmd == Cmd.RPU_SOFTMAX:
            return "softmax"
        if r.cmd == Cmd.HOST_CPU:
            return "cpu"
        return "channel"

    def _note(self, first: int, step: int, count: int, cat: str) -> None:
        """Record the completions of `count` commands at `first`, `first + step`, ... (category `cat`)."""
        step = max(step, 1)  # (a single completion: any step)
        last = first + (count - 1) * step
        self.end = max(self.end, last)
        self.pending.append((first, step, count, cat))
        if len(self.pending) > 4096:
            self.pending = [p for p in self.pending if p[0] + (p[2] - 1) * p[1] > self.cur]

    def _finish(self) -> EngineResult:
        """Charge the tail after `cur`: each stretch between consecutive completion times to the command
        completing at its end (at a tie, the smallest category name). Progressions are merged in time order;
        the completions of one progression before any other's next completion are charged in one step."""
        total = max(self.end, self.cur)
        t = self.cur
        heap = []
        for first, step, count, cat in self.pending:
            if first + (count - 1) * step <= t:
                continue
            if first <= t:  # drop the completions at or before `cur`
                k = (t - first) // step + 1
                first, count = first + k * step, count - k
            heap.append((first, cat, step, count))
        heapq.heapify(heap)
        while heap:
            at, cat, step, count = heapq.heappop(heap)
            if at <= t:  # ties with a completion already charged
                k = 1
            else:
                nxt = heap[0][0] if heap else at + count * step
                k = min(count, (nxt - at - 1) // step + 1) if nxt > at else 1
                last = at + (k - 1) * step
                self.bd[cat] += last - t
                t = last
            if count > k:
                heapq.heappush(heap, (at + k * step, cat, step, count - k))
        return EngineResult(total, self.t.tck_ns, dict(self.bd), self.refreshes, self.cur, dict(self.counts))

    # --- bank side ---------------------------------------------------------------------------------
    def _banks(self, r: Run) -> range | tuple[int]:
        return range(self.nbk) if r.bank == ALL else (r.bank,)

    def _earliest(self, r: Run, dep_t: int, dep_cat: str) -> tuple[int, str]:
        """Earliest issue time of one command of `r` and the category of the binding constraint."""
        t = self.t
        cands = [(self.last_issue + 1, r.cat), (dep_t, dep_cat)]
        cmd = r.cmd
        if cmd in (Cmd.ACT, Cmd.ACT_AB):
            banks = self._stagger_order()[:1] if (cmd == Cmd.ACT_AB and self.staggered) else self._banks(r)
            cands += self._act_rules(banks, all_bank=cmd == Cmd.ACT_AB and not self.staggered)
        elif cmd in (Cmd.PRE, Cmd.PRE_AB):
            banks = [b for b in self._banks(r) if self.open_row[b] >= 0]
            if banks:
                cands.append((max(max(self.t_act[b] + t.ras, self.t_rd[b] + t.rtp, self.t_wr_end[b] + t.wr)
                                  for b in banks), "row_switch"))  # fmt: skip
        elif cmd in _COLUMN_READS or cmd == Cmd.WR:
            banks = self._banks(r)
            if any(self.open_row[b] < 0 for b in banks):
                raise ValueError(f"{cmd.name} to a closed bank (stream must ACT first)")
            cands.append((max(self.t_act[b] for b in banks) + t.rcd, "row_switch"))
            same = r.bank == ALL or self.last_col_bg in (-1, self.bg[r.bank])
            held = self.all_col if self.last_col_all else 0
            if cmd == Cmd.WR:
                gap = (self.wr_gap if self.last_col_wr else t.ccd_l) if same else t.ccd_s
                cands += [(self.last_col + max(gap, held), r.cat), (self.last_rd + self.rtw, "host_write"),
                          (self.chan_t - t.cwl, r.cat)]  # fmt: skip
            else:
                cands.append((self.last_col + max(t.ccd_l if same else t.ccd_s, held), r.cat))
                same_wr = r.bank == ALL or self.last_wr_bg in (-1, self.bg[r.bank])
                cands.append((self.last_wr_end + (t.wtr_l if same_wr else t.wtr_s), "host_write"))
                if cmd == Cmd.RD:
                    cands.append((self.chan_t - t.cl, r.cat))
        best = max(cands, key=lambda c: c[0])
        return best

    def _stagger_order(self) -> list[int]:
        """The banks of a staggered all-bank ACT, the first ready first (a bank's own tRP and tRC), ties in
        bank-group-interleaved order."""
        t = self.t
        return sorted(self.act_order, key=lambda b: max(self.t_pre[b] + t.rp, self.t_act[b] + t.rc))

    def _act_rules(self, banks, all_bank: bool) -> list[tuple[int, str]]:
        t = self.t
        same = all_bank or self.last_act_bg == -1 or any(self.bg[b] == self.last_act_bg for b in banks)
        c = [(max(max(self.t_pre[b] + t.rp, self.t_act[b] + t.rc) for b in banks), "row_switch"),
             (self.last_act + (t.rrd_l if same else t.rrd_s), "row_switch")]  # fmt: skip
        if len(self.faw) == 4:
            c.append((self.faw[0] + t.faw, "row_switch"))
        return c

    def _commit_act(self, b: int, row: int, at: int) -> None:
        self.open_row[b], self.t_act[b] = row, at
        self.counts["act"] += 1

    def _commit(self, r: Run, at: int) -> int:
        """Apply one command of `r` issued at `at`; returns the issue time of its last sub-command."""
        cmd, t = r.cmd, self.t
        if cmd == Cmd.ACT or (cmd == Cmd.ACT_AB and not self.staggered):
            for b in self._banks(r):
                if self.open_row[b] >= 0:
                    raise ValueError(f"ACT to open bank {b} (stream must PRE first)")
                self._commit_act(b, r.row, at)
            self.last_act, self.last_act_bg = at, (-1 if cmd == Cmd.ACT_AB else self.bg[r.bank])
            self.faw.append(at)
        elif cmd == Cmd.ACT_AB:  # staggered: N_bk single ACTs, the first at `at`
            for b in self._stagger_order():
                at = max([at, self.last_issue + 1] + [c[0] for c in self._act_rules((b,), False)])
                self._commit_act(b, r.row, at)
                self.last_act, self.last_act_bg, self.last_issue = at, self.bg[b], at
                self.faw.append(at)
        elif cmd in (Cmd.PRE, Cmd.PRE_AB):
            for b in self._banks(r):
                if self.open_row[b] >= 0 or cmd == Cmd.PRE:
                    # A PRE to a closed bank is a no-op: it never shortens a block already set (a refresh's
                    # tRFC is kept as a late t_pre).
                    self.open_row[b], self.t_pre[b] = -1, max(self.t_pre[b], at)
        elif cmd in _COLUMN_READS or cmd == Cmd.WR:
            for b in self._banks(r):
                if cmd == Cmd.WR:
                    self.t_wr_end[b] = at + t.cwl + t.burst_cycles
                else:
                    self.t_rd[b] = at
            self.last_col, self.last_col_wr = at, cmd == Cmd.WR
            self.last_col_all = cmd != Cmd.WR and r.bank == ALL
            self.last_col_bg = -1 if r.bank == ALL else self.bg[r.bank]
            if cmd == Cmd.WR:
                self.last_wr_end, self.last_wr_bg = at + t.cwl + t.burst_cycles, self.last_col_bg
                self.chan_t = at + t.cwl + t.burst_cycles
            elif cmd == Cmd.RD:
                self.last_rd, self.chan_t = at, at + t.cl + t.burst_cycles
        self.last_issue = at
        return at

    def _gap(self, r: Run) -> int:
        """Spacing of back-to-back commands of a column run (0: not a column command)."""
        if r.cmd in _COLUMN_READS:
            return self.all_col if r.bank == ALL else self.t.ccd_l
        return self.wr_gap if r.cmd == Cmd.WR else 0

    def _completion(self, r: Run, at: int) -> int:
        t = self.t
        if r.cmd == Cmd.WR:
            return at + t.cwl + t.burst_cycles
        if r.cmd == Cmd.RD:
            return at + t.cl + t.burst_cycles
        if r.cmd == Cmd.REF:
            return at + t.rfc
        return at + (self._gap(r) or 1)

    def _charge(self, start: int, end: int, cat: str) -> None:
        if end > start:
            self.bd[cat] += end - start

    def _bank(self, r: Run, dep_t: int, dep_cat: str) -> int:
        """Schedule bank-side run `r`; returns its completion time."""
        if r.cmd == Cmd.REF:
            for _ in range(r.count):
                t0 = max(self.last_issue + 1, dep_t)
                self._refresh(t0, forced=True, restore=False)
            done = self.last_issue + self.t.rfc  # earlier REFs of the run complete before `cur`
            self._charge(self.cur, done, "refresh")
            self.cur = max(self.cur, done)
            self._note(done, 1, 1, r.cat)
            return done
        gap, n, at = self._gap(r), r.count, 0
        while n > 0:
            at, cat = self._earliest(r, dep_t, dep_cat)
            ready = at
            if self.refresh and at >= self.next_due:
                self._refresh(at, forced=False, restore=gap > 0)
                at, _ = self._earliest(r, dep_t, dep_cat)
            self._charge(self.cur, min(ready, at), cat)
            self._charge(max(self.cur, ready), at, "refresh")
            self.cur = max(self.cur, at)
            at = self._commit(r, at)
            self._charge(self.cur, at, "row_switch")  # staggered all-bank ACT: the later banks' ACTs
            self._charge(max(self.cur, at), at + gap, r.cat)
            self.cur = max(self.cur, at + gap)
            n -= 1
            m = 0
            if gap and n:  # closed form: the rest follow at `gap` spacing until a refresh falls due
                m = n if not self.refresh else min(n, max(0, -(-(self.next_due - at) // gap) - 1))
                if m:
                    self._commit(r, at + m * gap)
                    self.bd[r.cat] += m * gap
                    self.cur = at + (m + 1) * gap
                    n -= m
            # every command's own completion (a host RD / WR completes CL / CWL + BL/2 after its issue, past
            # the next command's issue), as the expanded stream records them
            self._note(self._completion(r, at), gap, 1 + m, r.cat)
            at += m * gap
        return self._completion(r, at)

    def _refresh(self, ready: int, forced: bool, restore: bool) -> None:
        """Execute due refreshes (or one, if `forced`) before a command ready at `ready`."""
        t = self.t
        opened = list(self.open_row)
        open_banks = [b for b in range(self.nbk) if opened[b] >= 0]
        start = ready if forced else self.next_due
        if open_banks:
            p = max([start, self.last_issue + 1] + [max(self.t_act[b] + t.ras, self.t_rd[b] + t.rtp,
                                                        self.t_wr_end[b] + t.wr) for b in open_banks])  # fmt: skip
            for b in open_banks:
                self.open_row[b], self.t_pre[b] = -1, p
            self.last_issue = p
        while forced or self.next_due <= ready:
            at = max(start if forced else self.next_due, self.last_issue + 1, max(self.t_pre) + t.rp)
            self.last_issue = at
            self.t_pre = [at + t.rfc - t.rp] * self.nbk  # no ACT before the refresh completes
            self.refreshes += 1
            if forced:
                break
            self.next_due += t.refi
        if restore and open_banks:
            rows = {opened[b] for b in open_banks}
            if len(open_banks) == self.nbk and len(rows) == 1:
                rr = Run(Cmd.ACT_AB, row=rows.pop())
                self._commit(rr, self._earliest(rr, 0, "refresh")[0])
            else:
                for b in open_banks:
                    rr = Run(Cmd.ACT, bank=b, row=opened[b])
                    self._commit(rr, self._earliest(rr, 0, "refresh")[0])
