"""Named systems: a whole machine (GPUs, links, memory-side device) plus serving parameters, as TOML files.

Built-in systems live in `l3/data/systems/*.toml`; a user passes either a name or a path to a copy they edited.
`SystemSpec.deploy(model)` checks the model fits and fixes the parallelism, failing early with a clear message.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from l3.devices.gpu import GpuModelParams
from l3.errors import SpecError
from l3.specs.base import SpecModel, as_field_error, load_toml
from l3.specs.dram import DramOrg, DramSpec, get_org, get_timing
from l3.specs.hardware import CpuSpec, GpuSpec, LinkSpec, get_cpu, get_gpu, get_link
from l3.specs.hbm_pim import HbmPimSpec
from l3.specs.model import ModelSpec
from l3.specs.pim import PimSpec


class GpuGroupSpec(SpecModel):
    preset: str
    count: int
    memory_reserve_fraction: float = 0.1  # HBM kept for activations and workspace (our assumption)
    model: GpuModelParams = GpuModelParams()

    @model_validator(mode="after")
    def _check(self) -> GpuGroupSpec:
        as_field_error(get_gpu, self.preset)
        if self.count < 1:
            raise ValueError("count must be >= 1")
        if not 0 <= self.memory_reserve_fraction < 1:
            raise ValueError("memory_reserve_fraction must be in [0, 1)")
        return self


class LinksSpec(SpecModel):
    nvlink: str = "nvlink3"
    host: str = "pcie4-x16"

    @model_validator(mode="after")
    def _check(self) -> LinksSpec:
        as_field_error(get_link, self.nvlink)
        as_field_error(get_link, self.host)
        return self


class ParallelSpec(SpecModel):
    tp: int
    dp: int

    @model_validator(mode="after")
    def _check(self) -> ParallelSpec:
        if self.tp < 1 or self.dp < 1:
            raise ValueError("tp and dp must be >= 1")
        return self


ParallelRule = ParallelSpec | Literal["auto", "paper"]
DEFAULT_KEY = "default"  # the parallelism table's entry for models it does not name
# The L3 paper's evaluation setup (Sec. 4): TP x DP of each model on the DGX-A100.
PAPER_PARALLELISM = {"opt-66b": ParallelSpec(tp=2, dp=4), "qwen-72b": ParallelSpec(tp=4, dp=2),
                     "gpt-175b": ParallelSpec(tp=8, dp=1)}  # fmt: skip


class SchedulerSpec(SpecModel):
    """Continuous batching with chunked prefill (units: tokens, requests)."""

    max_batched_tokens: int = 2048  # tokens per iteration (decode tokens + prefill chunk tokens)
    max_batch_size: int = 0  # running requests per replica; 0 = bounded by KV memory only
    block_size: int = 16  # KV allocation granularity, tokens
    watermark: float = 0.01  # fraction of KV blocks kept free at admission, to absorb decode growth

    @model_validator(mode="after")
    def _check(self) -> SchedulerSpec:
        if self.max_batched_tokens < 1 or self.block_size < 1 or self.max_batch_size < 0:
            raise ValueError("max_batched_tokens and block_size must be >= 1, max_batch_size >= 0")
        if not 0 <= self.watermark < 1:
            raise ValueError("watermark must be in [0, 1)")
        return self


class PimMemorySpec(SpecModel):
    """The host's DIMM-PIM: a DRAM timing preset on an organisation preset (fields overridable), plus PUs."""

    timing: str = "ddr4-3200"
    org: str = "ddr4-l3-2tb"
    org_overrides: dict[str, int] = Field(default_factory=dict)  # e.g. {channels = 8} for a capacity sweep
    pu: PimSpec = PimSpec()
    host_cpu: str = "epyc-7742-x2"  # the host's CPUs (the DGX-A100's): they merge partials when told to
    # One pool for every DP replica (l3-plus): every channel serves every replica's requests, and a request is
    # bound to no GPU group (its KV lives in the pool, the weights in every group), so each iteration's work
    # is dealt over the DP groups. False: each replica owns 1/dp of the channels (the paper's partition).
    shared: bool = False
    # How the PIM memory attaches to the host: "dimm" (its DIMM slots, the paper's) or "cxl" (memory expanders,
    # each a CXL device holding an equal share of the channels behind one `cxl_link`): every byte between the
    # GPUs and the PIM then also crosses the expander's link, after the GPU's host link.
    attach: Literal["dimm", "cxl"] = "dimm"
    cxl_devices: int = Field(8, ge=1)
    cxl_link: str = "cxl2-x16"

    @model_validator(mode="after")
    def _check(self) -> PimMemorySpec:
        dram = as_field_error(self.dram)
        as_field_error(get_cpu, self.host_cpu)
        as_field_error(get_link, self.cxl_link)
        if self.attach == "cxl" and dram.org.channels % self.cxl_devices:
            raise ValueError(f"the {dram.org.channels} channels must split evenly over cxl_devices "
                             f"({self.cxl_devices})")  # fmt: skip
        return self

    def dram(self) -> DramSpec:
        org = get_org(self.org)
        if self.org_overrides:
            org = DramOrg.build(org.model_dump() | self.org_overrides, where="org_overrides")
        return DramSpec(timing=get_timing(self.timing), org=org)


class AttentionDeviceSpec(SpecModel):
    """A baseline's memory-side attention device: one pool per replica (its 1/dp share of the machine's).

    `variant = "ideal"`: attention reads the KV cache at `bandwidth` and computes at `flops` (the paper's
    idealisation of the baselines). `"mechanism"`: times come from the device's mechanisms: bank-level
    HBM-PIM under HBM timing (`hbm`) or attention on the host CPU's cores over its DRAM (`cpu`). Figures
    left out are derived from `cpu` or `hbm` at their peak.
    """

    variant: Literal["ideal", "mechanism"] = "ideal"
    capacity_bytes: int | Literal["hbm"] | None = None  # whole machine; "hbm": the GPUs' HBM left by weights
    bandwidth: float | None = None  # bytes/s, whole machine: how fast attention reads the KV cache
    write_bandwidth: float | None = None  # bytes/s, whole machine: how fast new KV is written into the device
    flops: float | None = None  # FLOP/s, whole machine, for the attention arithmetic; 0 = never the limit
    cpu: str | CpuSpec | None = None  # CPU preset name or inline table (KV in its DRAM, attention on its cores)
    hbm: HbmPimSpec | None = None  # bank-level PIM in HBM stacks
    # Where the KV lives, for energy: "hbm" (bank PUs in HBM stacks) or "dimm" (DIMMs: rank PUs, or the CPU's
    # cores when `cpu` is given). Derived from `cpu`, `hbm` or capacity "hbm"; give it otherwise.
    memory: Literal["hbm", "dimm"] | None = None
    link: Literal["host", "none"] = "host"  # "host": Q/K/V and outputs cross the GPUs' host links
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> AttentionDeviceSpec:
        if self.cpu is not None and self.hbm is not None:
            raise ValueError("give either cpu or hbm, not both")
        if isinstance(self.cpu, str):
            as_field_error(get_cpu, self.cpu)
        if self.variant == "mechanism" and self.cpu is None and self.hbm is None:
            raise ValueError('variant = "mechanism" needs a cpu preset or an [attention.hbm] section')
        for f in ("capacity_bytes", "bandwidth", "write_bandwidth", "memory"):
            if self.resolved(f) is None:
                raise ValueError(f"{f} must be given (or derived from a cpu preset or an hbm section)")
        if self.capacity_bytes not in (None, "hbm") and self.capacity_bytes <= 0:
            raise ValueError('capacity_bytes must be > 0 or "hbm"')
        for f in ("bandwidth", "write_bandwidth"):
            if self.resolved(f) <= 0:
                raise ValueError(f"{f} must be > 0")
        if self.resolved("flops") < 0:
            raise ValueError("flops must be >= 0")
        return self

    def resolved(self, field: str):
        """A figure as given, else derived from the CPU or HBM-PIM spec (None where neither says)."""
        given = getattr(self, field)
        if given is not None:
            return given
        if field == "memory":
            if self.cpu is not None:
                return "dimm"
            return "hbm" if self.hbm is not None or self.capacity_bytes == "hbm" else None
        if self.cpu is not None:
            cpu = self.cpu_spec()
            return {"capacity_bytes": cpu.memory_bytes, "bandwidth": cpu.peak_bw, "write_bandwidth": cpu.peak_bw,
                    "flops": cpu.peak_flops}[field]  # fmt: skip
        if self.hbm is not None:
            return {"capacity_bytes": None, "bandwidth": self.hbm.peak_internal_bw,
                    "write_bandwidth": self.hbm.external_bw, "flops": 0.0}[field]  # fmt: skip
        return 0.0 if field == "flops" else None

    def cpu_spec(self) -> CpuSpec | None:
        return get_cpu(self.cpu) if isinstance(self.cpu, str) else self.cpu


class CoordinationSpec(SpecModel):
    """How the GPUs and the memory-side device share an iteration (L3 coordination; ablation switches)."""

    pipeline: bool = True  # two sub-batches whose GPU and PIM work overlap; off: run them back to back
    # Where one request's layer lives: "rankset" = its KV heads split over the channels of one rankset
    # (as many channels as keep every chip group of a rank full), "rank" = wholly inside one rank, "striped" =
    # heads split as "rankset", tokens cut into chunks of `chunk_tokens` rotating over the channel groups
    # (l3-plus; each slot's partial attention merged exactly where `partial_merge` says).
    placement: Literal["rankset", "rank", "striped"] = "rankset"
    chunk_tokens: int = Field(default=2048, ge=1)  # tokens per stripe chunk (docs/l3-plus.md: the sweep)
    # What a striped request-layer's chunks rotate over: the channel groups of its layer's rankset, or every
    # group of every rankset of the replica (groups first, then the next rankset).
    stripe_over: Literal["rankset", "replica"] = "replica"  # the defaults here: the sweep's choice
    partial_merge: Literal["gpu", "host"] = "host"  # who merges a striped request's partials (log-sum-exp)
    # Which slot of its stripe each new chunk of a striped request takes: "rotate" = chunk k at stripe position
    # k mod D (from the slot chosen at admission), "least-loaded" = the slot of its stripe not yet holding it with
    # the least predicted work when the chunk is first written (after D chunks the order repeats).
    chunk_order: Literal["rotate", "least-loaded"] = "rotate"
    rankset_overlap: bool = True  # a write blocks only the rank written; off: it blocks its whole channel
    policy: Literal["alignment", "fill-capacity", "halving"] = "alignment"
    decode_group: int = 0  # decodes placed at a time by the alignment policy; 0 = 1 for MHA, 16 for GQA
    # Under `alignment`: run an iteration as one batch when the predictors say two sub-batches would be slower.
    single_batch_fallback: bool = True
    # NEO-style asymmetric pipelining (systems whose KV lives off the GPUs: l3, pooled-attention): requests whose
    # KV fits the GPUs' spare HBM stay there and run attention on the GPU, in sub-batch 0 with all prefills;
    # the rest keep KV in the device and form sub-batch 1, whose attention overlaps sub-batch 0's GPU work.
    # "auto": both settings are probed on the workload, as parallelism "auto" is, and the better one runs.
    asymmetric: bool | Literal["auto"] = False
    # Run-time rebalancing (l3-plus; docs/l3-plus.md): after warm-up, every few iterations (REBALANCE_EVERY in
    # sched/subbatch.py), decodes move between sub-batches where the predictors say a layer gets shorter: from the
    # sub-batch whose GPU part + own attention is the longer to the other; under asymmetric pipelining, from the
    # device tier into HBM when nothing waits for the room (the KV crosses the host links during one iteration).
    rebalance: bool = False
    warmup_iterations: int = 16  # observations before the predictors drive decisions
    predictor_window: int = 512  # most recent observations the predictors train on


class SystemSpec(SpecModel):
    name: str
    kind: Literal["gpu-only", "l3", "pooled-attention"]
    description: str = ""
    gpu: GpuGroupSpec
    links: LinksSpec = LinksSpec()
    # "auto" (probe every TP x DP), "paper" (the paper's TP/DP) or {tp, dp}: for all models, or a table per model
    # name with an optional `default` entry for the models it does not list (default "auto").
    parallelism: ParallelRule | dict[str, ParallelRule] = "auto"
    scheduler: SchedulerSpec = SchedulerSpec()
    pim: PimMemorySpec | None = None
    attention: AttentionDeviceSpec | None = None
    coordination: CoordinationSpec = CoordinationSpec()

    @model_validator(mode="after")
    def _check_kind(self) -> SystemSpec:
        if self.kind == "l3" and self.pim is None:
            raise ValueError("pim: an l3 system needs a [pim] section")
        if self.kind == "pooled-attention" and self.attention is None:
            raise ValueError("attention: a pooled-attention system needs an [attention] section")
        kv_on_gpus = self.kind == "gpu-only" or (self.kind == "pooled-attention"
                                                 and self.attention.capacity_bytes == "hbm")  # fmt: skip
        if self.pim is not None and self.pim.shared and self.coordination.asymmetric:
            raise ValueError("pim.shared: a shared DIMM pool deals each iteration's requests over the DP groups, "
                             "but coordination.asymmetric keeps some KV in one group's HBM; set one of them false")
        if self.coordination.asymmetric and kv_on_gpus:
            raise ValueError("coordination.asymmetric: needs a memory-side device whose KV lives off the GPUs "
                             "(l3, or pooled-attention with its own capacity)")
        return self

    def tier_variants(self) -> list[SystemSpec]:
        """The concrete systems this file stands for: with and without the HBM tier where
        `coordination.asymmetric = "auto"` (a probe chooses, as for parallelism), else the file itself."""
        if self.coordination.asymmetric != "auto":
            return [self]
        return [with_overrides(self, {"coordination": {"asymmetric": v}}) for v in (True, False)]

    def parallelism_for(self, model: ModelSpec) -> tuple[ParallelSpec | Literal["auto"], str, str]:
        """What this file gives `model` (a TP/DP, or "auto"), the field it came from, and the rule's name
        ("fixed", "paper" or "auto")."""
        table = self.parallelism if isinstance(self.parallelism, dict) else {DEFAULT_KEY: self.parallelism}
        key = model.name if model.name in table else DEFAULT_KEY
        rule = table.get(key, "auto")
        where = "parallelism" if not isinstance(self.parallelism, dict) else f"parallelism.{key}"
        if rule == "paper":
            if model.name not in PAPER_PARALLELISM:
                raise SpecError(f"{self.name}: {where} = \"paper\": the paper gives TP/DP only for "
                                f"{', '.join(PAPER_PARALLELISM)}, not {model.name}; give {{tp, dp}} or \"auto\"")
            return PAPER_PARALLELISM[model.name], f"{where} (the paper's)", "paper"
        return rule, where, "auto" if rule == "auto" else "fixed"

    def parallel_candidates(self, model: ModelSpec) -> list[tuple[ParallelSpec, str | None]]:
        """Every TP x DP that uses all the GPUs (tp divides gpu.count, dp = count / tp), each with the reason
        it cannot serve `model` (None where it can): heads, KV heads, PIM channels, weights in HBM."""
        out = []
        for tp in range(1, self.gpu.count + 1):
            if self.gpu.count % tp == 0:
                par = ParallelSpec(tp=tp, dp=self.gpu.count // tp)
                out.append((par, self._problem(model, par, f"tp = {tp}, dp = {par.dp}")))
        return out

    def usable_hbm_bytes(self, tp: int) -> float:
        """HBM of a TP group left for weights and KV after the activation reserve."""
        return tp * get_gpu(self.gpu.preset).hbm_bytes * (1 - self.gpu.memory_reserve_fraction)

    def _problem(self, model: ModelSpec, par: ParallelSpec, where: str) -> str | None:
        """Why `par` cannot hold `model` on this machine (None if it can)."""
        gpu = get_gpu(self.gpu.preset)
        if model.n_heads % par.tp:
            return f"{where}: tp = {par.tp} must divide the model's n_heads = {model.n_heads}"
        if par.tp % model.n_kv_heads and model.n_kv_heads % par.tp:
            return f"{where}: tp = {par.tp} and n_kv_heads = {model.n_kv_heads}: one must divide the other"
        if par.tp * par.dp != self.gpu.count:
            return (f"{where}: tp x dp = {par.tp} x {par.dp} = {par.tp * par.dp} GPUs, but gpu.count = "
                    f"{self.gpu.count}; expected a TP x DP that uses every GPU (or set gpu.count)")  # fmt: skip
        if self.pim is not None and not self.pim.shared and self.pim.dram().org.channels % par.dp:
            return (f"{where}: dp = {par.dp} must divide pim channels = {self.pim.dram().org.channels} "
                    "(each replica owns a share of the channels)")  # fmt: skip
        usable = self.usable_hbm_bytes(par.tp)
        if model.weight_bytes >= usable:
            return (f"{where}: model weights {model.weight_bytes / 1e9:.1f} GB do not fit the "
                    f"{usable / 1e9:.1f} GB usable HBM of {par.tp} x {gpu.name}; expected a larger tp")
        return None

    def deploy(self, model: ModelSpec, parallel: ParallelSpec | Literal["paper"] | None = None,
               rule: str | None = None) -> Deployment:  # fmt: skip
        """Place `model` with the file's TP/DP, or with `parallel` ("paper": the paper's TP/DP), and check that it
        fits; raises SpecError naming the field. A model whose rule is "auto" needs `parallel` (the caller
        chooses it by probing a workload: `l3.run.choose_parallelism`)."""
        if self.coordination.asymmetric == "auto":
            raise SpecError(f"{self.name}: coordination.asymmetric = \"auto\" is chosen by probing a workload (l3 "
                            "simulate does this); deploy one of `tier_variants()`")
        if parallel == "paper":
            if model.name not in PAPER_PARALLELISM:
                raise SpecError(f"{self.name}: the paper gives TP/DP only for {', '.join(PAPER_PARALLELISM)}, "
                                f"not {model.name}")  # fmt: skip
            par, where, rule = PAPER_PARALLELISM[model.name], "parallelism (the paper's)", "paper"
        elif parallel is not None:
            par, where, rule = parallel, "parallelism", rule or "given"
        else:
            par, where, rule = self.parallelism_for(model)
            if par == "auto":
                raise SpecError(f"{self.name}: {where} = \"auto\" for {model.name}: the TP/DP is chosen by probing a "
                                "workload (l3 simulate does this); pass tp and dp to deploy a fixed one")
        problem = self._problem(model, par, f"{self.name}: {where}")
        if problem is not None:
            raise SpecError(problem)
        return Deployment(self, model, get_gpu(self.gpu.preset), get_link(self.links.nvlink),
                          get_link(self.links.host), par.tp, par.dp,
                          int(self.usable_hbm_bytes(par.tp) - model.weight_bytes), rule)  # fmt: skip


class Deployment:
    """A system with a model placed on it: the facts the simulator needs (per replica)."""

    def __init__(self, system: SystemSpec, model: ModelSpec, gpu: GpuSpec, nvlink: LinkSpec, host_link: LinkSpec,
                 tp: int, dp: int, hbm_free_bytes: int, rule: str = "fixed"):  # fmt: skip
        self.system, self.model, self.gpu, self.nvlink, self.host_link = system, model, gpu, nvlink, host_link
        self.tp, self.dp = tp, dp
        # How TP/DP were chosen, as reports show it: `rule` is "fixed" (the file), "paper", "auto" (probed) or
        # "given"; an "auto" choice adds the probe's figures (l3.run.choose_parallelism).
        self.selection: dict = {"rule": rule, "tp": tp, "dp": dp}
        self.hbm_free_bytes = hbm_free_bytes  # per replica, after weights and reserve

    @property
    def hbm_kv_tokens(self) -> int:
        """Whole-model KV tokens the spare HBM of one replica holds (a KV head with fewer heads than TP ranks is
        replicated tp / n_kv_heads times)."""
        m = self.model
        return int(self.hbm_free_bytes // (m.kv_bytes_per_token * max(1, self.tp // m.n_kv_heads)))

    @property
    def rule(self) -> str:
        return self.selection["rule"]

    def describe(self) -> dict:
        return {"system": self.system.name, "model": self.model.name, "gpu": f"{self.tp * self.dp} x {self.gpu.name}",
                "tp": self.tp, "dp": self.dp, "parallelism_rule": self.rule}  # fmt: skip


def with_overrides(spec: SystemSpec, overrides: dict, name: str | None = None) -> SystemSpec:
    """A copy of `spec` with nested fields replaced, e.g. {"coordination": {"pipeline": False}}."""

    def merge(base: dict, new: dict) -> dict:
        out = dict(base)
        for k, v in new.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    data = merge(spec.model_dump(), overrides)
    if name is not None:
        data["name"] = name
    return SystemSpec.build(data, where=f"{spec.name} with {overrides}")


SYSTEMS_PACKAGE = "l3.data.systems"


def builtin_system_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(SYSTEMS_PACKAGE).iterdir() if p.name.endswith(".toml"))


def get_system(name_or_path: str) -> SystemSpec:
    """A built-in system by name, or a TOML file path."""
    p = Path(name_or_path)
    if p.suffix == ".toml":
        return SystemSpec.build(load_toml(p), where=str(p))
    names = builtin_system_names()
    if name_or_path not in names:
        raise SpecError(
            f"unknown system {name_or_path!r}; expected one of: {', '.join(names)} or a .toml path"
        )
    path = resources.files(SYSTEMS_PACKAGE) / f"{name_or_path}.toml"
    with resources.as_file(path) as fp:
        return SystemSpec.build(load_toml(fp), where=f"system {name_or_path}")
