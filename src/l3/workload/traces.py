"""Loaders for request-trace files: Azure LLM CSV, length-only CSV, simple CSV and Mooncake-style JSONL.

The format is recognised from the content: a first non-blank character `{` means JSONL (one JSON object per
line), anything else is CSV whose header picks the format. Every loader returns a Workload with the file's own
arrivals (relative seconds; all 0 for length-only files) and mode "online" when the file has timestamps.
"""

from __future__ import annotations

import csv
import io
import json
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from l3.errors import WorkloadError
from l3.workload.workload import Workload, from_rows

if TYPE_CHECKING:
    import pandas as pd  # imported where a file is parsed: 0.15 s that the built-in workloads need not pay

#: CSV formats: name -> (required columns, description). Columns map to (arrival, prompt, output).
CSV_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "azure": (("TIMESTAMP", "ContextTokens", "GeneratedTokens"), "Azure LLM inference trace CSV"),
    "lengths": (("num_prefill_tokens", "num_decode_tokens"), "length-only CSV"),
    "simple": (("arrival_s", "prompt_len", "output_len"), "simple CSV"),
}
JSONL_FIELDS = ("timestamp", "input_length", "output_length")
PREFIX_BLOCK_TOKENS = 512  # tokens per Mooncake hash_ids block
MAX_INTEGER = 2.0**53  # integers are parsed through float64, exact below this


def load_trace(path: Path, name: str | None = None) -> Workload:
    """Parse a trace file into a Workload (all valid rows, file arrivals); WorkloadError if malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"cannot read workload file {path}: {exc}") from exc
    stripped = text.lstrip()
    if not stripped:
        raise WorkloadError(f"{path.name}: file is empty (expected a header line and request rows)")
    parse = _parse_jsonl if stripped.startswith("{") else _parse_csv
    return parse(path, text, name or str(path))


def _numbers(values: pd.Series, lines: np.ndarray, file: str, field: str, *, integer: bool) -> np.ndarray:
    """Vectorised parse of one column; WorkloadError naming file, first bad line and field."""
    import pandas as pd

    num = pd.to_numeric(values, errors="coerce").astype(np.float64).to_numpy()
    bad = ~np.isfinite(num)
    if values.dtype == bool or values.dtype == object:  # JSON true/false is no number
        bad |= values.map(lambda v: isinstance(v, bool | np.bool_)).to_numpy(bool)
    if integer:  # and exactly representable: a count beyond 2^53 tokens is no request length
        bad |= np.isfinite(num) & ((num != np.round(num)) | (np.abs(num) >= MAX_INTEGER))
    if bad.any():
        i = int(np.argmax(bad))
        expected = "an integer below 2^53" if integer else "a finite number"
        raw = values.iloc[i]
        missing = raw is None or raw == "" or (isinstance(raw, float) and np.isnan(raw))
        got = "an empty field" if missing else reprlib.repr(raw)
        if isinstance(raw, bool | np.bool_):
            got = f"the JSON literal {str(bool(raw)).lower()}"
        raise WorkloadError(f"{file} line {lines[i]}, {field}: expected {expected}, got {got}")
    return num.astype(np.int64) if integer else num


def _read_csv(path: Path, text: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The data rows as strings under the header's (stripped) names, and each row's line number; blank lines are
    skipped; a row whose field count differs from the header's, a repeated column name or a CSV syntax error is a
    WorkloadError naming the line."""
    import pandas as pd

    reader = csv.reader(io.StringIO(text))
    body, lines = [], []
    try:
        header = [c.strip() for c in next(reader)]
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise WorkloadError(f"{path.name} line {reader.line_num}: {len(row)} fields; expected {len(header)}, "
                                    "as in the header")  # fmt: skip
            body.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise WorkloadError(f"{path.name} line {reader.line_num}: not valid CSV ({exc})") from None
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise WorkloadError(f"{path.name} line 1: column {', '.join(map(repr, dup))} appears more than once")
    return pd.DataFrame(body, columns=header, dtype=str), np.asarray(lines, np.int64)


def _parse_csv(path: Path, text: str, name: str) -> Workload:
    import pandas as pd

    df, lines = _read_csv(path, text)
    header = set(df.columns)
    fmt = max(CSV_FORMATS, key=lambda f: len(header & set(CSV_FORMATS[f][0])))
    required, kind = CSV_FORMATS[fmt]
    missing = [c for c in required if c not in header]
    if len(missing) == len(required):
        known = "; ".join(",".join(cols) for cols, _ in CSV_FORMATS.values())
        raise WorkloadError(
            f"{path.name} line 1: unrecognised header {sorted(header)}; expected one of: {known}"
        )
    if missing:
        raise WorkloadError(f"{path.name} line 1: {kind} is missing column {', '.join(missing)}")
    if df.empty:
        raise WorkloadError(f"{path.name}: no request rows after the header")

    def col(c: str, integer: bool = True) -> np.ndarray:
        return _numbers(df[c].str.strip(), lines, path.name, f"column {c}", integer=integer)

    if fmt == "azure":
        ts = pd.to_datetime(df["TIMESTAMP"].str.strip(), format="ISO8601", errors="coerce")
        if ts.isna().any():
            i = int(np.argmax(ts.isna().to_numpy()))
            raise WorkloadError(
                f"{path.name} line {lines[i]}, column TIMESTAMP: expected a date-time "
                f"'YYYY-MM-DD HH:MM:SS.fffffff', got {df['TIMESTAMP'].iloc[i]!r}"
            )
        arrival = (ts - ts.min()).dt.total_seconds().to_numpy()
        prompt, output = col("ContextTokens"), col("GeneratedTokens")
    elif fmt == "lengths":
        prompt, output = col("num_prefill_tokens"), col("num_decode_tokens")
        arrival = np.zeros(len(df))
    else:
        arrival = col("arrival_s", integer=False)
        prompt, output = col("prompt_len"), col("output_len")
    mode = "offline" if fmt == "lengths" else "online"
    source = f"{path} ({kind}, {len(df)} rows)"
    return from_rows(name, arrival, prompt, output, mode=mode, source=source)


def _parse_jsonl(path: Path, text: str, name: str) -> Workload:
    import pandas as pd

    numbered = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    try:  # one C-level parse for the whole file; per-line parse only to locate an error
        records = json.loads("[" + ",".join(line for _, line in numbered) + "]")
    except json.JSONDecodeError:
        records = None
    if records is None or len(records) != len(numbered) or not all(isinstance(r, dict) for r in records):
        for lineno, line in numbered:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{path.name} line {lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise WorkloadError(
                    f"{path.name} line {lineno}: expected a JSON object, got {line.strip()!r}"
                )
    df = pd.DataFrame.from_records(records)
    missing = [f for f in JSONL_FIELDS if f not in df.columns]
    if missing:
        raise WorkloadError(
            f"{path.name} line {numbered[0][0]}: missing field {', '.join(missing)} (expected on every line)"
        )
    lines = np.array([lineno for lineno, _ in numbered])

    def field(f: str, integer: bool = True) -> np.ndarray:
        return _numbers(df[f], lines, path.name, f"field {f}", integer=integer)

    arrival = field("timestamp", integer=False) / 1000.0  # ms -> s
    prompt, output = field("input_length"), field("output_length")
    blocks = _prefix_blocks(df["hash_ids"], lines, path.name) if "hash_ids" in df.columns else None
    source = f"{path} (Mooncake-style JSONL, {len(df)} rows{', with hash_ids' if blocks else ''})"
    return from_rows(name, arrival, prompt, output, mode="online", source=source, prefix_blocks=blocks)


def _prefix_blocks(column: pd.Series, lines: np.ndarray, fname: str) -> list[np.ndarray]:
    """hash_ids lists -> int64 arrays (block = PREFIX_BLOCK_TOKENS tokens); WorkloadError on a bad entry."""
    blocks = []
    for lineno, ids in zip(lines, column, strict=True):
        arr = np.asarray(ids) if isinstance(ids, list) else None
        if arr is None or arr.ndim != 1 or (arr.size and (arr.dtype.kind != "i" or arr.min() < 0)):
            raise WorkloadError(
                f"{fname} line {lineno}, field hash_ids: expected a list of non-negative integers, "
                f"got {reprlib.repr(ids)}"
            )
        blocks.append(arr.astype(np.int64))
    return blocks
