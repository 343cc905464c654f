"""One pipeline for every command: system spec -> deployment (parallelism chosen) -> simulation -> result.

Parallelism "auto" (docs/evaluation.md): every TP x DP that uses all the GPUs is a candidate
(`SystemSpec.parallel_candidates`). A candidate the model does not fit, or whose replica cannot hold the
workload's largest request, is dropped (if none holds it, those that reject the fewest requests stay). Each
remaining candidate serves a probe: `PROBE_REQUESTS` requests drawn from the workload without replacement
(seeded), all at t = 0; the one with the highest steady-state throughput (output tokens between the times 10%
and 90% of the probe's output was out, over that interval) is run; a probe stops once that 90% time is settled,
since nothing after it enters the figure. Ties go to the smaller TP. One surviving candidate is taken without a
probe. The same rule serves every system, so comparisons are at each one's best.
A file whose `coordination.asymmetric` is "auto" (l3-plus: its HBM KV tier) doubles the candidates, with and
without the tier, at every TP x DP (or at the fixed one) and the probe chooses among them too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np

from l3.errors import SpecError
from l3.parallel import process_map
from l3.sim.simulator import SimResult, Simulator
from l3.specs.model import ModelSpec
from l3.specs.system import Deployment, ParallelSpec, SystemSpec
from l3.workload import Workload

PROBE_REQUESTS = 200  # requests per probe run: enough for a steady batch, a small fraction of a 1,000-request run
PROBE_STREAM = 0x9A7A  # mixed into the seed so the probe's draw is its own random stream, apart from the workload's
ParallelChoice = ParallelSpec | Literal["auto", "paper"] | None


class Stopwatch:
    """Wall-clock seconds of a command's named parts (`summary.json` `wall_time_parts_s`)."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t0


def probe_workload(workload: Workload, n: int = PROBE_REQUESTS, seed: int = 0) -> Workload:
    """`n` requests of `workload` drawn without replacement (seeded), in their original order, all at t = 0."""
    rng = np.random.default_rng([seed, PROBE_STREAM])
    idx = np.sort(rng.choice(len(workload), size=min(n, len(workload)), replace=False))
    sub = workload.subset(idx, f"{workload.name} (probe)", f"{len(idx)} requests drawn from {workload.name}")
    return dataclasses.replace(sub, arrival_s=np.zeros(len(idx)), mode="offline")


def rejected_by(dep: Deployment, workload: Workload) -> int:
    """Requests of `workload` that a replica of `dep` can never serve (rejected when they arrive)."""
    sched = Simulator(dep, workload).schedulers[0]
    return int(sched.unservable(workload.prompt_len + workload.output_len).sum())


def choose_parallelism(spec: SystemSpec, model: ModelSpec, workload: Workload, seed: int = 0,
                       probe_requests: int = PROBE_REQUESTS, jobs: int = 1) -> Deployment:  # fmt: skip
    """The best TP x DP for `model` on `spec` by the rule above (and the HBM tier's setting where the file leaves
    it to a probe); its `selection` records every candidate. `jobs`: processes probing candidates side by side
    (the figures do not depend on it)."""
    cands = [(v, par, problem) for v in spec.tier_variants() for par, problem in v.parallel_candidates(model)]
    return _best(spec, model, workload, seed, probe_requests, cands, "auto", jobs)


def _best(spec: SystemSpec, model: ModelSpec, workload: Workload, seed: int, probe_requests: int,
          cands: list[tuple[SystemSpec, ParallelSpec | Literal["paper"] | None, str | None]], rule: str,
          jobs: int = 1) -> Deployment:
    """Deploy each (concrete system, parallelism, why it cannot serve or None) candidate, drop those that do not fit
    or reject more requests than the best, probe the rest and return the best (ties: smaller TP, then the first)."""
    tiers = len(spec.tier_variants()) > 1
    rows, deps = [], []
    for variant, par, problem in cands:
        row = {"tp": None, "dp": None, "status": "", "rejected": None, "probe_steady_tok_s": None}
        if tiers:
            row["asymmetric"] = variant.coordination.asymmetric
        rows.append(row)
        if problem is not None:
            row |= {"tp": par.tp, "dp": par.dp, "status": f"does not fit: {problem.split(': ', 1)[-1]}"}
            continue
        dep = variant.deploy(model, par, rule=rule) if rule == "auto" else variant.deploy(model, par)
        row |= {"tp": dep.tp, "dp": dep.dp, "rejected": rejected_by(dep, workload)}
        deps.append((row, dep))
    if not deps:
        reasons = "; ".join(f"TP{r['tp']} x DP{r['dp']}: {r['status']}" for r in rows)
        raise SpecError(f"{spec.name}: parallelism = \"auto\" for {model.name}: no TP x DP fits ({reasons})")
    fewest = min(r["rejected"] for r, _ in deps)
    for r, _ in deps:
        if r["rejected"] > fewest:
            r["status"] = f"dropped: rejects {r['rejected']} requests its replicas cannot hold"
    deps = [(r, d) for r, d in deps if r["rejected"] == fewest]
    probe = probe_workload(workload, probe_requests, seed)
    if len(deps) > 1:
        with process_map(min(jobs, len(deps))) as mapper:
            figures = mapper(_probe, [(dep, probe) for _, dep in deps])
        for (row, _), steady in zip(deps, figures, strict=True):
            row |= {"probe_steady_tok_s": steady, "status": "probed"}
    best_row, best = max(deps, key=lambda rd: (rd[0]["probe_steady_tok_s"] or 0.0, -rd[1].tp))
    best_row["status"] = "chosen" if len(deps) > 1 else "chosen (the only candidate left)"
    best.selection |= {"probe_requests": len(probe) if len(deps) > 1 else 0,
                       "probe_metric": "steady_throughput_tok_s", "candidates": rows}  # fmt: skip
    if tiers:
        best.selection["asymmetric"] = best.system.coordination.asymmetric
    return best


def _probe(job: tuple[Deployment, Workload]) -> float | None:
    """One candidate's probe: its steady-state output throughput on the probe workload, tok/s."""
    dep, probe = job
    res = Simulator(dep, probe).run(until_output=0.9)
    return res.metrics.steady_throughput(res.output_total)


def deploy(spec: SystemSpec, model: ModelSpec, workload: Workload, seed: int = 0,
           parallel: ParallelChoice = None, jobs: int = 1) -> Deployment:  # fmt: skip
    """Place `model` on `spec` for `workload`: with `parallel` if given, else the file's rule for the model.
    `jobs`: processes for the probe, where there is one."""
    rule = parallel if parallel is not None else spec.parallelism_for(model)[0]
    if rule == "auto":
        return choose_parallelism(spec, model, workload, seed, jobs=jobs)
    fixed = None if parallel is None else rule
    if len(spec.tier_variants()) > 1:  # the parallelism is fixed; the probe chooses the HBM tier's setting
        return _best(spec, model, workload, seed, PROBE_REQUESTS, [(v, fixed, None) for v in spec.tier_variants()],
                     "fixed", jobs)  # fmt: skip
    return spec.deploy(model, fixed)


def simulate(spec: SystemSpec, model: ModelSpec, workload: Workload, seed: int = 0,
             parallel: ParallelChoice = None, progress: Callable[[int], None] | None = None,
             wall: Stopwatch | None = None, jobs: int = 1) -> SimResult:  # fmt: skip
    """Deploy and serve `workload`; the result's deployment says how its TP/DP was chosen. `wall` (if given)
    gets the parts "choose_parallelism" and "simulate"; `jobs`: processes for the probe."""
    wall = wall or Stopwatch()
    with wall.part("choose_parallelism"):
        dep = deploy(spec, model, workload, seed, parallel, jobs)
    with wall.part("simulate"):
        return Simulator(dep, workload).run(progress=progress)


def parse_parallel(text: str | None) -> ParallelChoice:
    """A command-line parallelism: "auto", "paper" or "TPxDP" (e.g. "4x2")."""
    if text is None or text in ("auto", "paper"):
        return text
    try:
        tp, dp = (int(x) for x in text.lower().split("x"))
        return ParallelSpec(tp=tp, dp=dp)
    except (ValueError, SpecError):
        raise SpecError(f"--parallelism {text!r}: expected auto, paper or TPxDP with whole numbers >= 1, "
                        "e.g. 4x2") from None  # fmt: skip
