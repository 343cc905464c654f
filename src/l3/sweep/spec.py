"""A sweep spec (TOML) and the points it expands to.

    base = "l3"                      # a built-in system or a .toml file
    models = ["opt-66b", "qwen-72b"]
    workloads = ["openr1"]
    requests = 100                   # per point
    seed = 0                         # workload seed, and the seed of random axes
    parallelism = "paper"            # "paper", "auto", "TPxDP", or absent: the system file's rule

    [axes]                           # dotted paths into the system file
    "pim.org_overrides.channels" = [8, 16]
    "coordination.policy" = ["alignment", "halving"]
    "pim.pu.bank_pu.gqa_reuse_max" = { range = [2, 9, 2] }             # 2, 4, 6, 8 (stop excluded)
    "pim.pu.rank_pu.clock_ghz" = { random = { low = 0.5, high = 2.0, n = 3 } }  # add integer = true, log = true

Points are the product of every axis with the models and workloads; random axes draw their values once from the
spec's seed, so a spec always names the same points.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from l3.errors import SpecError
from l3.specs.base import SpecModel, load_toml


class RandomAxis(SpecModel):
    low: float
    high: float
    n: int = Field(ge=1)
    integer: bool = False
    log: bool = False


class SweepSpec(SpecModel):
    base: str
    models: list[str] = Field(min_length=1)
    workloads: list[str] = Field(min_length=1)
    requests: int = Field(100, ge=1)
    seed: int = 0
    parallelism: str | None = None
    axes: dict[str, list | dict] = Field(default_factory=dict)

    @field_validator("axes")
    @classmethod
    def _check_axes(cls, axes: dict) -> dict:
        for path, v in axes.items():
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"axis {path!r}: expected a dotted path such as pim.org_overrides.channels")
            if isinstance(v, list) and not v:
                raise ValueError(f"axis {path!r}: an empty list of values")
            if isinstance(v, dict) and (set(v) - {"range", "random"} or len(v) != 1):
                raise ValueError(f"axis {path!r}: expected a list, {{range = [start, stop, step]}} or "
                                 "{random = {low, high, n}}")  # fmt: skip
        return axes

    def axis_values(self) -> dict[str, list]:
        """Each axis's values, in order (random axes drawn from `seed`)."""
        out = {}
        for k, (path, v) in enumerate(sorted(self.axes.items())):
            if isinstance(v, list):
                out[path] = v
            elif "range" in v:
                r = v["range"]
                if not (isinstance(r, list) and len(r) in (2, 3)):
                    raise SpecError(f"axis {path!r}: range must be [start, stop] or [start, stop, step]")
                vals = np.arange(*r).tolist()
                if not vals:
                    raise SpecError(f"axis {path!r}: range {r} is empty")
                out[path] = vals
            else:
                try:
                    rnd = RandomAxis.model_validate(v["random"])
                except Exception as exc:
                    raise SpecError(f"axis {path!r}: random needs low, high and n ({exc})") from None
                rng = np.random.default_rng([self.seed, k])
                lo, hi = (np.log(rnd.low), np.log(rnd.high)) if rnd.log else (rnd.low, rnd.high)
                x = rng.uniform(lo, hi, rnd.n)
                x = np.exp(x) if rnd.log else x
                out[path] = [round(float(a)) for a in x] if rnd.integer else [float(a) for a in x]
        return out

    def points(self) -> list[Point]:
        """Every point of the sweep, in a fixed order."""
        axes = self.axis_values()
        paths = list(axes)
        pts = []
        for model, workload, *vals in itertools.product(self.models, self.workloads, *axes.values()):
            pts.append(Point(self.base, model, workload, self.requests, self.seed, self.parallelism,
                             tuple(zip(paths, vals, strict=True))))  # fmt: skip
        return pts


@dataclass(frozen=True)
class Point:
    """One simulation of a sweep: a base system with `params` (dotted path, value) set."""

    base: str
    model: str
    workload: str
    requests: int
    seed: int
    parallelism: str | None
    params: tuple[tuple[str, Any], ...]

    def overrides(self) -> dict:
        """The params as a nested override of the system file."""
        out: dict = {}
        for path, value in self.params:
            *head, last = path.split(".")
            node = out
            for part in head:
                node = node.setdefault(part, {})
            node[last] = value
        return out

    def key(self) -> dict:
        return {"base": self.base, "model": self.model, "workload": self.workload, "requests": self.requests,
                "seed": self.seed, "parallelism": self.parallelism, **dict(self.params)}  # fmt: skip

    @property
    def point_id(self) -> str:
        """A stable name for the point (what a resumed sweep matches finished points by)."""
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """The varied values in short: model, workload and each axis's last path component."""
        return ", ".join([self.model, self.workload] + [f"{p.rsplit('.', 1)[-1]}={v}" for p, v in self.params])


def load_sweep(path: Path) -> SweepSpec:
    return SweepSpec.build(load_toml(path), where=str(path))
