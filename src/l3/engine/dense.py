"""The dense layers' projections on the CPU, each run in whichever of its equivalent forms is fastest here.

x W^T for a weight W (N, K) and a decode batch's few rows x has up to four forms, the same products summed in
other orders: PyTorch's `linear` (what transformers runs), (W x^T)^T (taller weights in slices of TALL_CHUNK output
rows), for one row of fp32 the host GEMV kernel (`host_kernel.gemv`), and, for a decode batch where the model came
from a GGUF file whose blocks reproduce the weight exactly (`engine.packed`), the packed kernel reading the blocks
(`host_kernel.gemv_packed`). Which is fastest depends on the CPU, its caches and the weight's shape: on the 2-core
AMD EPYC machine of docs/benchmarks.md the GEMV and the transposed form read SmolLM2's weights 1.2-2x faster than
`linear`; on a Xeon with 480 MB of L3 `linear` ran a 1-row decode step in 17.6 ms against 37.7 ms through the GEMV
(whose thread hand-offs then cost more than its reads). So the engine measures rather than assumes: the first time
a row count of a new bucket (powers of two up to FEW_ROWS) meets the model, each form runs over every weight of the
model, in model order, as a decode step streams them (ROUNDS rounds, interleaved, after one untimed call per
weight kind), each call timed; per weight kind (shape, dtype, packed format) the form with the least time serves
that bucket from then on, for every model of this process. Timing each kind inside a whole pass leaves the caches
as a decode step leaves them (a pass over one kind's weights alone can keep them all in a large L3 and favours
the bulkier forms). Rows beyond FEW_ROWS (prefill chunks) always go to `linear`. The environment variable
L3_DENSE_FORM (`linear`, `transposed`, `gemv` or `packed`) pins one form wherever it serves (`linear` elsewhere),
for runs whose logits must not depend on a timing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch

from l3.engine import host_kernel
from l3.engine.packed import PackedWeight
from l3.errors import EngineError

FEW_ROWS = 64  # rows up to which the form is chosen by measurement (decode batches)
# A weight taller than 2 x TALL_CHUNK (an LM head) multiplies in slices of TALL_CHUNK output rows in the transposed
# form: SmolLM2's head (49,152 x 576) took 20.8 ms for 32 rows in slices of 2,048 against 26.0 ms whole on the AMD
# machine (2-8 rows unchanged), each output the same dot product.
TALL_CHUNK = 2048
ROUNDS = 2  # timed passes per form when choosing (the least is kept; this machine's speed drifts over minutes)

Form = Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor | None]


def _with_bias(mod: torch.nn.Linear, y: torch.Tensor) -> torch.Tensor:
    return y if mod.bias is None else y + mod.bias


def _linear(mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return mod(x)


def _transposed(mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, xt = mod.weight, x.t()
    if w.shape[0] <= 2 * TALL_CHUNK:
        return _with_bias(mod, (w @ xt).t())
    y = torch.empty(w.shape[0], x.shape[0], dtype=torch.result_type(w, x))
    for a in range(0, w.shape[0], TALL_CHUNK):
        torch.mm(w[a : a + TALL_CHUNK], xt, out=y[a : a + TALL_CHUNK])
    return _with_bias(mod, y.t())


def _gemv(mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    y = host_kernel.gemv(mod.weight, x[0]) if x.shape[0] == 1 else None
    return None if y is None else _with_bias(mod, y[None])


FORMS: dict[str, Form] = {"linear": _linear, "transposed": _transposed, "gemv": _gemv}
PACKED = "packed"  # the form of a weight with GGUF blocks (DenseForms.packed), beside FORMS
PIN = "L3_DENSE_FORM"  # environment variable: one form for every projection it serves


def bucket(rows: int) -> int:
    """The row-count bucket a choice serves: the next power of two."""
    return 1 << (rows - 1).bit_length()


class DenseForms:
    """`linear(mod, x)` = mod(x) for a model's Linear modules, on the CPU through the fastest form for x's rows
    (chosen by measurement once per weight shape, dtype, packed format and row bucket; the choices are shared by
    every instance: they describe this machine). `packed`: the modules' weights in GGUF blocks, where there are."""

    chosen: ClassVar[dict[tuple, str]] = {}  # (N, K, dtype, bucket[, packed format]) -> form name

    def __init__(self, modules: Iterable[torch.nn.Linear], packed: dict[torch.nn.Linear, PackedWeight] | None = None):
        self.packed = packed or {}
        self.order = [(mod, self._kind(mod)) for mod in modules]  # (module, its kind) in model order
        self.first: dict[tuple, torch.nn.Linear] = {}  # (N, K, dtype[, format]) -> the first weight of that kind
        for mod, kind in self.order:
            self.first.setdefault(kind, mod)
        # (module, rows, pinned form) -> the form serving it: a decode step makes 200-odd calls, and this lookup
        # costs about 1.2 us a call less than finding the form anew from the weight's shape and row bucket
        self._served: dict[tuple, Form] = {}

    def _kind(self, mod: torch.nn.Linear) -> tuple:
        w, p = mod.weight, self.packed.get(mod)
        return (*w.shape, w.dtype) if p is None else (*w.shape, w.dtype, p.kind)

    def _packed(self, mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        p = self.packed.get(mod)
        return None if p is None else host_kernel.gemv_packed(p, x)

    def _forms(self) -> dict[str, Form]:
        return FORMS | {PACKED: self._packed}

    def linear(self, mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """mod(x) for a 2-D x."""
        rows = x.shape[0]
        if rows > FEW_ROWS or x.device.type != "cpu":
            return mod(x)
        pinned = os.environ.get(PIN)
        form = self._served.get((mod, rows, pinned))
        if form is None:
            form = self._served[mod, rows, pinned] = self._forms()[self._form(mod, x, pinned)]
        y = form(mod, x)
        return mod(x) if y is None else y  # None: the form does not serve this row count or weight

    def _form(self, mod: torch.nn.Linear, x: torch.Tensor, pinned: str | None) -> str:
        """The name of the form serving mod for x's rows: the pinned one, else the one measured fastest."""
        if pinned:
            if pinned not in self._forms():
                raise EngineError(f"{PIN}={pinned!r}: expected one of {', '.join(self._forms())}")
            return pinned
        kind = self._kind(mod)
        key = (*kind[:3], bucket(x.shape[0]), *kind[3:])
        return self.chosen.get(key) or self._choose(key, x)

    def _choose(self, key: tuple, x: torch.Tensor) -> str:
        """Time every form over the model's weights in model order (each form where it serves a kind, else
        `linear`); keep the fastest for every kind in x's row bucket, and return `key`'s."""
        rows, everyone = x.shape[0], self._forms()
        xs = {kd[1]: torch.randn(rows, kd[1], dtype=x.dtype) for kd in self.first}
        xs[x.shape[1]] = x
        serves = {(name, kd): everyone[name](m, xs[kd[1]]) is not None  # each called once per kind, untimed
                  for name in everyone for kd, m in self.first.items()}  # fmt: skip
        spent = {(name, kd): float("inf") for name, kd in serves}
        for _ in range(ROUNDS):
            for name, form in everyone.items():
                totals = dict.fromkeys(self.first, 0.0)
                for m, kd in self.order:
                    f = form if serves[name, kd] else _linear
                    t0 = time.perf_counter()
                    f(m, xs[kd[1]])
                    totals[kd] += time.perf_counter() - t0
                for kd, t in totals.items():
                    if serves[name, kd]:
                        spent[name, kd] = min(spent[name, kd], t)
        for kd in self.first:
            best = min((name for name in everyone if serves[name, kd]), key=lambda n: spent[n, kd])
            DenseForms.chosen[(*kd[:3], bucket(rows), *kd[3:])] = best
        return DenseForms.chosen[key]

    @classmethod
    def summary(cls) -> str:
        """The choices made so far, one per weight shape (and packed format) and row bucket: "576x1536 <= 32 rows:
        linear; 576x576 Q4_1 <= 1 rows: packed; ..."."""
        order = sorted(cls.chosen.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][1], kv[0][4:]))
        return "; ".join(f"{key[0]}x{key[1]}{''.join(' ' + f for f in key[4:])} <= {key[3]} rows: {form}"
                         for key, form in order) or "none"  # fmt: skip
