"""The dense layers' projections on the CPU, each run in whichever of its equivalent forms is fastest here.

x W^T for a weight W (N, K) and a decode batch's few rows x has three forms, the same products summed in other
orders: PyTorch's `linear` (what transformers runs), (W x^T)^T (taller weights in slices of TALL_CHUNK output
rows), and, for one row of fp32, the host GEMV kernel (`host_kernel.gemv`). Which is fastest depends on the CPU,
its caches and the weight's shape: on the 2-core AMD EPYC machine of docs/benchmarks.md the GEMV and the
transposed form read SmolLM2's weights 1.2-2x faster than `linear`; on a Xeon with 480 MB of L3, where the whole
model sits in cache, `linear` ran a 1-row decode step in 17.6 ms against 37.7 ms through the GEMV (whose thread
hand-offs then cost more than its reads). So the engine measures rather than assumes: the first time a weight
shape meets a row count of a new bucket (powers of two up to FEW_ROWS), each form runs over every weight of that
shape in the model, in model order, as a decode step streams them (ROUNDS rounds, interleaved, after one
untimed call each), and the form with the least time serves that bucket from then on, for every model of this
process. Rows beyond FEW_ROWS (prefill chunks) always go to `linear`. The environment variable L3_DENSE_FORM
(`linear`, `transposed` or `gemv`) pins one form wherever it serves (`linear` elsewhere), for runs whose logits
must not depend on a timing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch

from l3.engine import host_kernel
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
PIN = "L3_DENSE_FORM"  # environment variable: one form for every projection it serves


def bucket(rows: int) -> int:
    """The row-count bucket a choice serves: the next power of two."""
    return 1 << (rows - 1).bit_length()


class DenseForms:
    """`linear(mod, x)` = mod(x) for a model's Linear modules, on the CPU through the fastest form for x's rows
    (chosen by measurement once per weight shape, dtype and row bucket; the choices are shared by every instance:
    they describe this machine)."""

    chosen: ClassVar[dict[tuple, str]] = {}  # (N, K, dtype, bucket) -> form name

    def __init__(self, modules: Iterable[torch.nn.Linear]):
        self.peers: dict[tuple, list[torch.nn.Linear]] = {}  # (N, K, dtype) -> every weight of that shape
        for mod in modules:
            self.peers.setdefault((*mod.weight.shape, mod.weight.dtype), []).append(mod)
        # (module, rows, pinned form) -> the form serving it: a decode step makes 200-odd calls, and this lookup
        # costs about 1.2 us a call less than finding the form anew from the weight's shape and row bucket
        self._served: dict[tuple, Form] = {}

    def linear(self, mod: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """mod(x) for a 2-D x."""
        rows = x.shape[0]
        if rows > FEW_ROWS or x.device.type != "cpu":
            return mod(x)
        pinned = os.environ.get(PIN)
        form = self._served.get((mod, rows, pinned))
        if form is None:
            form = self._served[mod, rows, pinned] = FORMS[self._form(mod, x, pinned)]
        y = form(mod, x)
        return mod(x) if y is None else y  # None: the GEMV does not serve this row count or weight

    def _form(self, mod: torch.nn.Linear, x: torch.Tensor, pinned: str | None) -> str:
        """The name of the form serving mod for x's rows: the pinned one, else the one measured fastest."""
        if pinned:
            if pinned not in FORMS:
                raise EngineError(f"{PIN}={pinned!r}: expected one of {', '.join(FORMS)}")
            return pinned
        w = mod.weight
        key = (*w.shape, w.dtype, bucket(x.shape[0]))
        return self.chosen.get(key) or self._choose(key, mod, x)

    def _choose(self, key: tuple, mod: torch.nn.Linear, x: torch.Tensor) -> str:
        """Time every form that serves x over all weights of mod's shape; keep the fastest for key's bucket."""
        peers = self.peers.get(key[:3], [mod])
        forms = [name for name, form in FORMS.items() if form(mod, x) is not None]  # each called once, untimed
        spent = dict.fromkeys(forms, float("inf"))
        for _ in range(ROUNDS):
            for name in forms:
                form = FORMS[name]
                t0 = time.perf_counter()
                for peer in peers:
                    form(peer, x)
                spent[name] = min(spent[name], time.perf_counter() - t0)
        DenseForms.chosen[key] = best = min(forms, key=spent.__getitem__)
        return best

    @classmethod
    def summary(cls) -> str:
        """The choices made so far, one per weight shape and row bucket: "576x1536 <= 32 rows: linear; ..."."""
        order = sorted(cls.chosen.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][1]))
        return "; ".join(f"{n}x{k} <= {b} rows: {form}" for (n, k, _, b), form in order) or "none"
