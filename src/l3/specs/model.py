"""Transformer model shapes: presets and Hugging Face `config.json` loading.

All sizes are in elements unless the name says bytes. Parameter counts cover the decoder layers,
embeddings and LM head; biases and norms are included because they are small but real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, model_validator

from l3.errors import SpecError
from l3.specs.base import SpecModel, lookup, require_positive


class ModelSpec(SpecModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "4096" or true is not a count

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    ffn_kind: Literal["gated", "plain"]  # gated: SwiGLU (up, gate, down); plain: up, act, down (OPT/GPT)
    # rope: rotary embedding of Q and K in every layer (Llama, Qwen, Mistral); learned: a learned absolute position
    # embedding added to the token embedding once, before the first layer (OPT, GPT-3)
    positional: Literal["rope", "learned"] = "rope"
    vocab_size: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False
    # Tokens a request may hold (prompt + output; Hugging Face's max_position_embeddings); None: no limit (the
    # presets: the L3 paper runs its models at contexts beyond their trained windows, as a systems study).
    max_context: int | None = None
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        require_positive(self, ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size"))
        if self.max_context is not None and self.max_context < 1:
            raise ValueError("max_context must be >= 1 token, or None for no limit")
        if self.n_kv_heads > self.n_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must be <= n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.dtype_bytes not in (1, 2, 4):
            raise ValueError("dtype_bytes must be 1, 2 or 4")
        return self

    # --- derived shapes -------------------------------------------------------------------------
    @property
    def gqa_group(self) -> int:
        """Query heads sharing one KV head (1 = MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def qkv_params_per_layer(self) -> int:
        return self.d_model * (self.q_dim + 2 * self.kv_dim)

    @property
    def o_params_per_layer(self) -> int:
        return self.q_dim * self.d_model

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.ffn_kind == "gated" else 2

    @property
    def ffn_params_per_layer(self) -> int:
        return self.ffn_matrices * self.d_model * self.ffn_dim

    @property
    def params_per_layer(self) -> int:
        return (
            self.qkv_params_per_layer + self.o_params_per_layer + self.ffn_params_per_layer + 4 * self.d_model
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)

    @property
    def n_params(self) -> int:
        return self.n_layers * self.params_per_layer + self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.dtype_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer, bytes."""
        return 2 * self.kv_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, bytes."""
        return self.n_layers * self.kv_bytes_per_token_layer


def _m(name, layers, d, heads, kv, ffn, kind, vocab, source, head_dim=None, tied=False, max_ctx=None,
       positional="rope"):  # fmt: skip
    return ModelSpec(
        name=name, n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv,
        head_dim=head_dim or d // heads, ffn_dim=ffn, ffn_kind=kind, vocab_size=vocab,
        tied_embeddings=tied, max_context=max_ctx, source=source, positional=positional,
    )  # fmt: skip


MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _m(
            "opt-66b",
            64,
            9216,
            72,
            72,
            36864,
            "plain",
            50272,
            "facebook/opt-66b config.json; L3 paper Sec. 4",
            positional="learned",
        ),
        _m(
            "qwen-72b",
            80,
            8192,
            64,
            8,
            24576,
            "gated",
            152064,
            "L3 paper's GQA-8 variant of Qwen-72B (80 layers, 64 query / 8 KV heads, d 8192); "
            "FFN 24576 gated and vocab 152064 from Qwen/Qwen-72B config.json",
        ),
        _m("gpt-175b", 96, 12288, 96, 96, 49152, "plain", 50257, "Brown et al. 2020 (GPT-3 175B); L3 paper",
           positional="learned"),
        _m("llama-2-7b", 32, 4096, 32, 32, 11008, "gated", 32000, "meta-llama/Llama-2-7b-hf config.json"),
        _m("llama-2-13b", 40, 5120, 40, 40, 13824, "gated", 32000, "meta-llama/Llama-2-13b-hf config.json"),
        _m("llama-2-70b", 80, 8192, 64, 8, 28672, "gated", 32000, "meta-llama/Llama-2-70b-hf config.json"),
        _m("llama-3-8b", 32, 4096, 32, 8, 14336, "gated", 128256, "meta-llama/Meta-Llama-3-8B config.json"),
        _m("llama-3-70b", 80, 8192, 64, 8, 28672, "gated", 128256, "meta-llama/Meta-Llama-3-70B config.json"),
    ]
}

_HF_LLAMA_LIKE = {"llama", "qwen2", "mistral"}
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8": 1}


def model_from_hf_config(path: Path) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config.json (Llama, Qwen2, Mistral or OPT). Every field it reads is
    checked (a positive integer where a count is meant); anything else is a SpecError naming file and field."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    return model_from_hf_dict(cfg, path)


def model_from_hf_dict(cfg: object, path: Path | str) -> ModelSpec:
    """`model_from_hf_config` for the fields of a config already read (e.g. a loaded model's); `path` names
    where they came from in errors."""
    if not isinstance(cfg, dict):
        raise SpecError(f"{path}: the top level is a JSON {type(cfg).__name__}; expected an object of config fields")
    mtype = str(cfg.get("model_type", "")).lower()

    def count(key: str, default: int | None = None) -> int:
        """A positive integer field (required unless a default is given)."""
        if key not in cfg or cfg[key] is None:
            if default is None:
                raise SpecError(f"{path}: field {key!r} missing (required for model_type {mtype!r})")
            return default
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(f"{path}: field {key!r} is {v!r}; expected a positive integer")
        return v

    dtype = cfg.get("torch_dtype", "float16")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise SpecError(f"{path}: field 'torch_dtype' is {dtype!r}; expected one of {', '.join(_DTYPE_BYTES)}")
    tied = cfg.get("tie_word_embeddings", mtype == "opt")
    if not isinstance(tied, bool):
        raise SpecError(f"{path}: field 'tie_word_embeddings' is {tied!r}; expected true or false")
    name = cfg.get("_name_or_path") or Path(str(path)).parent.name or "hf-model"
    common = dict(name=str(name), dtype_bytes=_DTYPE_BYTES[dtype], source=str(path))
    if mtype not in (*_HF_LLAMA_LIKE, "opt"):
        raise SpecError(
            f"{path}: field 'model_type' is {mtype!r}; expected one of llama, qwen2, mistral, opt"
        )
    heads, d = count("num_attention_heads"), count("hidden_size")
    if "head_dim" in cfg and mtype in _HF_LLAMA_LIKE:
        head_dim = count("head_dim")
    elif d % heads:
        raise SpecError(f"{path}: field 'hidden_size' ({d}) is not a multiple of 'num_attention_heads' ({heads}); "
                        f"expected a multiple, or a 'head_dim' field")  # fmt: skip
    else:
        head_dim = d // heads
    if mtype in _HF_LLAMA_LIKE:
        data = dict(
            n_layers=count("num_hidden_layers"), d_model=d, n_heads=heads,
            n_kv_heads=count("num_key_value_heads", heads), head_dim=head_dim,
            ffn_dim=count("intermediate_size"), ffn_kind="gated", vocab_size=count("vocab_size"),
            tied_embeddings=tied,
            max_context=count("max_position_embeddings", 131072), **common,
        )  # fmt: skip
    else:
        data = dict(
            n_layers=count("num_hidden_layers"), d_model=d, n_heads=heads, n_kv_heads=heads, head_dim=head_dim,
            ffn_dim=count("ffn_dim"), ffn_kind="plain", vocab_size=count("vocab_size"), positional="learned",
            tied_embeddings=tied,
            max_context=count("max_position_embeddings", 2048), **common,
        )  # fmt: skip
    return ModelSpec.build(data, where=str(path))


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by name, or a Hugging Face config.json (a file, or a folder holding one)."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_dir():
        return model_from_hf_config(p / "config.json" if p.is_dir() else p)
    return lookup(MODEL_PRESETS, name_or_path, "model")
