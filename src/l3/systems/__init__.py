"""System models: how a deployment turns an iteration's work into time on its devices."""

from __future__ import annotations

from l3.specs.system import Deployment
from l3.systems.base import SystemModel
from l3.systems.gpu_only import GpuOnlySystem


def build_system(dep: Deployment) -> SystemModel:
    """The system model for a deployment, chosen by the system file's `kind`."""
    if dep.system.kind == "l3":
        from l3.systems.l3 import L3System

        return L3System(dep)
    if dep.system.kind == "pooled-attention":
        from l3.systems.pooled import PooledAttentionSystem

        return PooledAttentionSystem(dep)
    return GpuOnlySystem(dep)


__all__ = ["SystemModel", "build_system"]
