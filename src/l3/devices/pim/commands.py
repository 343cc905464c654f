"""The DIMM-PIM command set as data, and the run-length stream form the timing engine consumes.

A stream is an iterable of `Run`s: `count` back-to-back copies of one command with the same arguments, so a
256K-token context is a few hundred thousand runs, not tens of millions of commands. `expand` turns a stream
into single commands; the engine must give the same answer for both forms.

Each command executes on one unit of the rank (see timing.py):
- bank side (DDR command bus to the chips, the DRAM arrays and the bank PUs): ACT, PRE, ACT_AB, PRE_AB, RD and
  WR to a bank, REF, PIM_WR_R, PIM_LD_SB, PIM_MAC;
- the rank-PU link (rank PU <-> chips, B_rk): PIM_RD_RB, PIM_WR_SB, RD_AB;
- the rank PU's adder and softmax units: RPU_SUM, RPU_SOFTMAX (internal to the rank PU, not bus commands);
- the host CPU's share for this rank: HOST_CPU (re-layout without the rank PU's in-flight path);
- the channel data bus: RD and WR addressed to the rank PU window (bank = PU).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from enum import IntEnum
from typing import NamedTuple

ALL = -1  # bank field: every bank of every chip of the rank (all-bank command)
PU = -2  # bank field: the rank PU's host-visible window (no DRAM bank touched)


class Cmd(IntEnum):
    ACT = 0  # activate one bank (row)
    PRE = 1  # precharge one bank
    ACT_AB = 2  # activate the same row in all banks of all chips
    PRE_AB = 3  # precharge all banks
    RD = 4  # host column read: a DRAM bank (bank >= 0) or the rank PU window (bank = PU)
    WR = 5  # host column write: a DRAM bank (in-flight re-layout applied) or the rank PU window
    REF = 6  # all-bank refresh (inserted by the engine every tREFI; may also appear in a stream)
    PIM_WR_R = 7  # configure bank-PU mode / registers (MAC datapath, softmax scale factor)
    PIM_LD_SB = 8  # all-bank column read from the open row into each chip's shared buffer
    PIM_WR_SB = 9  # rank PU -> shared buffers over the link; size = bytes per chip
    PIM_MAC = 10  # all-bank column read, multiply-accumulate with the shared buffer into the result buffer
    PIM_RD_RB = 11  # result buffers -> rank PU over the link; size = bytes per chip
    RD_AB = 12  # open rows of all banks streamed to the rank PU over the link (naive layout); size per chip
    RPU_SUM = 13  # rank-PU adder: size = values summed
    RPU_SOFTMAX = 14  # rank-PU softmax unit: size = values (exp, max/sum update, or rescale)
    HOST_CPU = 15  # host CPU re-lays out bytes it read back (no in-flight re-layout): size = bytes


BANK_CMDS = frozenset({Cmd.ACT, Cmd.PRE, Cmd.ACT_AB, Cmd.PRE_AB, Cmd.REF, Cmd.PIM_WR_R, Cmd.PIM_LD_SB,
                       Cmd.PIM_MAC})  # fmt: skip
LINK_CMDS = frozenset({Cmd.PIM_RD_RB, Cmd.PIM_WR_SB, Cmd.RD_AB})


class Run(NamedTuple):
    """`count` identical commands. `tag` names the run's completion (the last command's) so later runs can
    `wait` for it; `cat` is the breakdown category charged for its own time and for bank-side waits on it."""

    cmd: Cmd
    count: int = 1
    bank: int = ALL
    row: int = 0
    size: int = 0
    tag: Hashable | None = None
    wait: tuple[Hashable, ...] = ()
    cat: str = "compute"


def expand(stream: Iterable[Run]) -> Iterator[Run]:
    """The same stream as single commands (the tag moves to the last copy)."""
    for r in stream:
        for i in range(r.count):
            yield r._replace(count=1, tag=r.tag if i == r.count - 1 else None)
