"""Hypothesis strategies for malformed and adversarial input files, and the check each loader must pass: a valid
result or the project's error, never another exception, never a row or request unaccounted for.

Used by tests/test_fuzz.py (a bounded number of examples) and bench/fuzz_loaders.py (a longer run)."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from l3.errors import L3Error
from l3.sched.requests import Status
from l3.sim.simulator import Simulator
from l3.specs.base import load_toml
from l3.specs.model import get_model
from l3.specs.system import ParallelSpec, SystemSpec, get_system
from l3.workload import load_workload
from l3.workload.traces import CSV_FORMATS, JSONL_FIELDS

# Field values that break naive parsers: numbers out of range, wrong types, text, empties, specials.
NUMBERS = st.one_of(st.integers(-5, 5000), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.sampled_from(["", " ", "abc", "1e20", "-0", "0x10", "nan", "inf", "1,5", '"7"', "\t3", "٣", "1_000", "NULL"])
JSON_VALUES = st.one_of(NUMBERS, TEXT, st.none(), st.booleans(), st.lists(st.integers(-3, 3), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # fmt: skip

SIM_DEP = None  # a small deployment for serving what loads (built once)


def _mostly(valid, bad, one_in: int = 25):
    """`valid` but for about one draw in `one_in` per field, then `bad` (files of all-bad rows teach little)."""
    return st.integers(0, one_in - 1).flatmap(lambda k: bad if k == 0 else valid)


def _cell(draw) -> str:
    v = draw(_mostly(st.integers(0, 5000).map(str), st.one_of(NUMBERS.map(str), TEXT)))
    return v.replace("\n", " ")


@st.composite
def csv_traces(draw) -> tuple[str, int]:
    """(CSV text, data lines): a known header (sometimes with a column missing, renamed or extra) and rows of
    valid and invalid cells (sometimes too few or too many), blank lines included."""
    cols = list(draw(st.sampled_from([c for c, _ in CSV_FORMATS.values()])))
    if draw(st.booleans()):
        cols = draw(st.permutations(cols))
    if draw(st.integers(0, 14)) == 0:
        cols.pop(draw(st.integers(0, len(cols) - 1)))
    if draw(st.integers(0, 14)) == 0:
        cols.append(draw(st.sampled_from(["extra", "TIMESTAMP", "prompt_len", ""])))
    lines = [",".join(cols)]
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 9)) == 0:
            lines.append("")
            continue
        n = len(cols) + draw(_mostly(st.just(0), st.sampled_from([-1, 1])))
        cells = []
        for c in cols[: max(n, 0)] + [""] * max(n - len(cols), 0):
            if c == "TIMESTAMP":
                cells.append(draw(_mostly(st.sampled_from(["2023-11-16 18:15:46.6805900", "2023-11-16 18:15:47"]),
                                          st.sampled_from(["2023-11-16", "x", "", "0"]))))  # fmt: skip
            else:
                cells.append(_cell(draw))
        lines.append(",".join(cells))
    text = "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))
    return text, sum(1 for ln in lines[1:] if ln.strip(", \t"))


@st.composite
def jsonl_traces(draw) -> tuple[str, int]:
    """(JSONL text, data lines): objects with the Mooncake fields (sometimes missing or of the wrong type), an
    occasional hash_ids, broken line or non-object line."""
    lines, hashed = [], draw(st.booleans())
    for _ in range(draw(st.integers(1, 10))):
        if draw(st.integers(0, 29)) == 0:
            lines.append(draw(st.sampled_from(["{", "[1, 2]", "3", '"x"', "{'a': 1}", "null"])))
            continue
        rec = {}
        for f in JSONL_FIELDS:
            if draw(st.integers(0, 59)) == 0:
                continue
            rec[f] = draw(_mostly(st.integers(0, 20000), JSON_VALUES, 60))
        if hashed:
            rec["hash_ids"] = draw(_mostly(st.lists(st.integers(0, 50), max_size=4),
                                           st.one_of(st.lists(st.integers(-2, 50), max_size=4), JSON_VALUES), 60))
        lines.append(json.dumps(rec, allow_nan=True))
    return "\n".join(lines) + "\n", len(lines)


CONFIG_FIELDS = ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "ffn_dim", "torch_dtype",
                 "tie_word_embeddings")  # fmt: skip


@st.composite
def hf_configs(draw) -> str:
    """A config.json text: a plausible Llama/OPT config with fields dropped, retyped or out of range, or not an
    object at all."""
    if draw(st.integers(0, 14)) == 0:
        return draw(st.sampled_from(["[]", "3", '"llama"', "null", "{", ""]))
    cfg = {"model_type": draw(st.sampled_from(["llama", "qwen2", "mistral", "opt", "gpt2", "", 7])),
           "num_attention_heads": 8, "hidden_size": 1024, "num_hidden_layers": 2, "intermediate_size": 2048,
           "ffn_dim": 2048, "vocab_size": 1000, "num_key_value_heads": 4, "max_position_embeddings": 4096}  # fmt: skip
    for f in draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=4)):
        if draw(st.booleans()):
            cfg.pop(f, None)
        else:
            cfg[f] = draw(st.one_of(JSON_VALUES, st.sampled_from(["float16", "int4", "bfloat16"])))
    return json.dumps(cfg, allow_nan=True)


def toml_text(data: dict, prefix: str = "") -> str:
    """A minimal TOML writer for nested tables of scalars and lists (enough for system files)."""
    scalars, tables = [], []
    for k, v in data.items():
        key = json.dumps(str(k))
        if isinstance(v, dict):
            tables.append(toml_text(v, f"{prefix}{key}."))
        else:
            scalars.append(f"{key} = {_toml_value(v)}")
    head = [f"[{prefix[:-1]}]"] if prefix else []
    return "\n".join(head + scalars + [""] + tables)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _leaves(data: dict, path=()) -> list[tuple]:
    out = []
    for k, v in data.items():
        out += _leaves(v, (*path, k)) if isinstance(v, dict) else [(*path, k)]
    return out


@st.composite
def system_files(draw) -> str:
    """A built-in system file with some fields retyped, out of range, removed or added, or a syntax error."""
    name = draw(st.sampled_from(["gpu-only", "l3", "l3-plus", "cpu-offload", "hbm-pim"]))
    with resources.as_file(resources.files("l3.data.systems") / f"{name}.toml") as fp:
        data = load_toml(fp)
    leaves = _leaves(data)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(leaves))
        node = data
        for k in path[:-1]:
            node = node[k]
        action = draw(st.integers(0, 5))
        if action == 0:
            node.pop(path[-1], None)
        elif action == 1:
            key = draw(st.sampled_from(["extra", "tile_m", "count"]))
            node[key] = draw(JSON_VALUES.filter(lambda v: v is not None))
        else:
            node[path[-1]] = draw(st.one_of(NUMBERS, TEXT, st.booleans(), st.lists(st.integers(-1, 4), max_size=2)))
    text = toml_text(data)
    if draw(st.integers(0, 9)) == 0:
        text += draw(st.sampled_from(["\n[gpu\n", "\nx = \n", "\n= 3\n", "\n[[a]]\n[a]\n"]))
    return text


def check_trace(path: Path, data_lines: int) -> None:
    """A trace file loads into a valid workload whose rows are all accounted for (kept or refused), which then
    serves with every request done or rejected; or it is refused with the project's error."""
    try:
        w = load_workload(str(path))
    except L3Error:
        return
    assert len(w) + w.rows_refused <= data_lines
    assert sum(w.refused_reasons.values()) == w.rows_refused
    assert np.all(w.prompt_len >= 1) and np.all(w.output_len >= 1) and np.all(np.diff(w.arrival_s) >= 0)
    if len(w) <= 12 and w.prompt_len.max() < 10**6:
        global SIM_DEP
        if SIM_DEP is None:
            SIM_DEP = get_system("gpu-only").deploy(get_model("llama-2-7b"), ParallelSpec(tp=1, dp=8))
        res = Simulator(SIM_DEP, w).run()
        assert np.all(np.isin(res.table.status, (Status.DONE, Status.REJECTED)))


def check_config(path: Path) -> None:
    """A config.json gives a valid model or the project's error."""
    try:
        m = get_model(str(path))
    except L3Error:
        return
    assert m.n_heads % m.n_kv_heads == 0 and m.head_dim >= 1 and m.n_layers >= 1


def check_system(path: Path) -> None:
    """A system file gives a system that deploys (or says why not) with the project's error, never another."""
    try:
        spec = get_system(str(path))
        assert isinstance(spec, SystemSpec)
        for v in spec.tier_variants():
            v.deploy(get_model("llama-2-7b"), ParallelSpec(tp=1, dp=v.gpu.count))
    except L3Error:
        return


LOADERS = {  # name: (strategy, file name, check); a strategy drawing (text, rows) passes rows on to its check
    "trace CSV": (csv_traces(), "trace.csv", check_trace),
    "trace JSONL": (jsonl_traces(), "trace.jsonl", check_trace),
    "config.json": (hf_configs(), "config.json", check_config),
    "system TOML": (system_files(), "system.toml", check_system),
}
