"""Projection weights kept in their GGUF block formats beside the dequantized fp32 model.

transformers loads a GGUF file's Q4_1 and Q8_0 tensors as fp32 (4 bytes a weight); the engine runs the same fp32
model, so a decode step streams every weight's 4 bytes. Kept from the file's blocks (0.75 and 1.125 bytes a
weight: each block's codes, and its fp16 scales widened to fp32, exactly, so that the kernel broadcasts them
from memory), the host kernel (`host_kernel.gemv_packed`) rebuilds each weight in fp32 as gguf-py does and makes
the same products, summed in another order. A tensor is kept only where its blocks dequantize bit for bit to the
loaded module's weight (so a name or row-order mismatch only means no packed form); the check runs once, when
the cache entry is made, beside the converted model (`loader._converted`), which keeps the file's blocks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = {"Q4_1": 0, "Q8_0": 1}  # the GGUF block formats the kernel reads -> its kind code
# Per block of 32 weights: its fp16 scales (Q4_1: d and the minimum m; Q8_0: d), then its code bytes
LAYOUT = {"Q4_1": (2, 16), "Q8_0": (1, 32)}
FILE = "packed.npz"  # in the converted model's cache folder


@dataclass(frozen=True)
class PackedWeight:
    """A (N, K) weight from GGUF blocks in the kernel's layout: `codes` (N, K / 32 x code bytes a block; uint8)
    and `scales` (N, K / 32, scales a block; fp32, the blocks' fp16 values); `kind`: a key of KINDS."""

    kind: str
    codes: np.ndarray
    scales: np.ndarray
    k: int

    @classmethod
    def from_blocks(cls, kind: str, blocks: np.ndarray, k: int) -> PackedWeight:
        """From N rows of GGUF blocks (uint8)."""
        n_scales, code_bytes = LAYOUT[kind]
        b = blocks.reshape(len(blocks), k // 32, 2 * n_scales + code_bytes)
        scales = np.ascontiguousarray(b[..., : 2 * n_scales]).view(np.float16).astype(np.float32)
        return cls(kind, np.ascontiguousarray(b[..., 2 * n_scales :]).reshape(len(blocks), -1), scales, k)

    @property
    def blocks(self) -> np.ndarray:
        """The N rows of GGUF blocks again (fp16 -> fp32 -> fp16 is exact)."""
        n = len(self.codes)
        half = self.scales.astype(np.float16).view(np.uint8)
        return np.concatenate([half, self.codes.reshape(n, self.k // 32, -1)], axis=2).reshape(n, -1)

    @property
    def code(self) -> int:
        return KINDS[self.kind]

    @functools.cached_property
    def addresses(self) -> tuple[int, int, int]:
        """(codes' address, scales' address, bytes of both): what a kernel call passes (reading numpy's ctypes
        view anew costs microseconds on every one of a decode step's 200-odd calls)."""
        return self.codes.ctypes.data, self.scales.ctypes.data, self.codes.nbytes + self.scales.nbytes


def dequantize(w: PackedWeight) -> np.ndarray:
    """The fp32 (N, K) weight, as gguf-py computes it (the reference the kernel must match)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(w.blocks, GGMLQuantizationType[w.kind]).reshape(len(w.codes), w.k)


def _llama_rows(n: int, heads: int) -> np.ndarray:
    """The GGUF row of each of a Llama Q or K projection's n rows: llama.cpp permutes them for its rotary layout
    and transformers permutes them back (its LlamaTensorProcessor); this is that inverse on row indices."""
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(2, 1).reshape(n)


def from_gguf(path: Path, hf) -> dict[str, PackedWeight]:
    """The Linear modules of `hf` (loaded from the GGUF file at `path`, fp32) whose weight a Q4_1 or Q8_0 tensor
    of the file reproduces exactly: module name -> its packed weight."""
    import gguf
    import torch

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        return {}
    cfg = hf.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors if t.tensor_type.name in KINDS}
    out = {}
    for name, mod in hf.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod.weight.dtype != torch.float32 or mod.bias is not None:
            continue
        base = names.get_name(name)
        candidates = [base, "token_embd"] if name == "lm_head" else [base]  # a tied head is the embedding's
        for gname in filter(None, candidates):
            t = tensors.get(f"{gname}.weight")
            if t is None:
                continue
            blocks = np.asarray(t.data)
            n, k = mod.weight.shape
            if blocks.shape[0] != n:
                continue
            if arch_name == "llama" and gname.endswith(("attn_q", "attn_k")):
                heads = cfg.num_attention_heads if gname.endswith("attn_q") else cfg.num_key_value_heads
                blocks = blocks[_llama_rows(n, heads)]
            packed = PackedWeight.from_blocks(t.tensor_type.name, blocks, k)
            if np.array_equal(dequantize(packed), mod.weight.detach().numpy()):
                out[name] = packed
                break
    return out


def save(folder: Path, packed: dict[str, PackedWeight]) -> None:
    """Write `packed` into the model's cache folder (an empty file records that none matched)."""
    arrays = {f"{name}|{w.kind}|{w.k}": w.blocks for name, w in packed.items()}
    tmp = folder / f"{FILE}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(folder / FILE)


def load(folder: Path) -> dict[str, PackedWeight] | None:
    """The packed weights saved in `folder`, or None where none were saved yet."""
    try:
        with np.load(folder / FILE) as data:
            out = {}
            for key in data.files:
                name, kind, k = key.rsplit("|", 2)
                out[name] = PackedWeight.from_blocks(kind, data[key], int(k))
            return out
    except (OSError, ValueError, KeyError):
        return None
