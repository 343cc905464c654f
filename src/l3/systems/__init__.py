"""System models: how a deployment turns an iteration's work into time on its devices."""

from __future__ import annotations

from l3.specs.system import Deployment
from l3.systems.base import IterationTiming, SystemModel
from l3.systems.gpu_only import GpuOnlySystem

_KINDS: dict[str, type[SystemModel]] = {"gpu-only": GpuOnlySystem}


def build_system(dep: Deployment) -> SystemModel:
    """The system model for a deployment, chosen by the system file's `kind`."""
    return _KINDS[dep.system.kind](dep)


__all__ = ["IterationTiming", "SystemModel", "build_system"]
