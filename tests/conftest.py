"""Shared fixtures: small systems and workloads that run in milliseconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

from l3.specs.model import get_model
from l3.specs.system import PAPER_PARALLELISM, ParallelSpec, SystemSpec
from l3.workload.workload import Workload


def small_system(kv_fraction_reserve: float = 0.83, dp: int = 1, **sched) -> SystemSpec:
    """llama-2-7b on A100s with most HBM reserved, so the KV pool holds only a few thousand tokens."""
    return SystemSpec.build({
        "name": "test-small", "kind": "gpu-only",
        "gpu": {"preset": "a100-80gb", "count": dp, "memory_reserve_fraction": kv_fraction_reserve},
        "parallelism": {"llama-2-7b": {"tp": 1, "dp": dp}},
        "scheduler": {"max_batched_tokens": 512, **sched},
    })  # fmt: skip


def paper_or_dp8(model: str) -> ParallelSpec | str:
    """The paper's TP x DP for its models, else TP1 x DP8 (a small model on the 8-GPU built-in systems)."""
    return "paper" if model in PAPER_PARALLELISM else ParallelSpec(tp=1, dp=8)


def make_workload(arrival, prompt, output, mode="online") -> Workload:
    return Workload(name="test", arrival_s=np.asarray(arrival, float), prompt_len=np.asarray(prompt, np.int64),
                    output_len=np.asarray(output, np.int64), mode=mode, source="test")  # fmt: skip


@pytest.fixture
def rng() -> tuple[np.random.Generator, int]:
    """A freshly seeded generator and its seed (printed, so pytest shows it with any failure)."""
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"data seed {seed}")
    return np.random.default_rng(seed), seed


@pytest.fixture
def llama7b():
    return get_model("llama-2-7b")


# CI runs property tests with a fixed derivation of examples (reproducible); local runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def _pim_store(tmp_path_factory):
    """One PIM measurement store for the test session, shared by the xdist workers (their temp folders have one
    parent), so a configuration is measured once per session and never in the user's cache."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if root.name.startswith("popen-gw") else root
    os.environ.setdefault("L3_PIM_STORE", str(shared / "pim-measurements.sqlite"))
