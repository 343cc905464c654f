"""The real engine: Hugging Face models run on the L3 split. Dense layers (embeddings, projections, MLPs, LM
head) run with PyTorch on the dense device; the KV cache lives in the scheduler's paged blocks and decode
attention runs on a memory-side backend (`attention.BACKENDS`: cpu, pim, gpu). The scheduler is `l3.sched`'s,
the same object the simulator drives. Needs the `engine` extra (torch, transformers)."""

BACKEND_NAMES = ("gpu", "cpu", "pim")  # attention.BACKENDS' keys, here for a check that needs no torch

