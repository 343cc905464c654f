"""Common base for specs: strict pydantic models and readable validation errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from l3.errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T", bound="SpecModel")


class SpecModel(BaseModel):
    """Immutable, strictly validated spec. Unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def build(cls: type[T], data: dict[str, Any], where: str = "") -> T:
        """Validate `data`, turning pydantic's report into one SpecError naming field and expectation."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, cls.__name__, where)) from None


def format_validation_error(exc: ValidationError, kind: str, where: str = "") -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{field}: {msg}{got_s}")
    prefix = f"{where}: " if where else ""
    return f"{prefix}invalid {kind}: " + "; ".join(parts)


def as_field_error(check, *args):
    """Run `check(*args)` inside a validator: its SpecError becomes a ValueError, so the message reaches the user
    through `SpecModel.build`, with the file and field it came from."""
    try:
        return check(*args)
    except SpecError as exc:
        raise ValueError(str(exc)) from None


def require_positive(spec: BaseModel, fields: tuple[str, ...], unit: str = "") -> None:
    """Raise naming the first of `fields` that is not > 0 (for model validators)."""
    for f in fields:
        if getattr(spec, f) <= 0:
            raise ValueError(f"{f} must be > 0{unit}")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, reporting syntax errors with file and line."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML: {exc}") from None


def preset_names(presets: dict[str, Any]) -> list[str]:
    return sorted(presets)


def lookup(presets: dict[str, T], name: str, kind: str) -> T:
    """Find a preset by (case-insensitive) name or fail listing the valid names."""
    key = name.lower()
    if key not in presets:
        raise SpecError(f"unknown {kind} {name!r}; expected one of: {', '.join(sorted(presets))}")
    return presets[key]
