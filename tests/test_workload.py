"""Workloads: named traces, synthetic sets, malformed files, rejected rows, tiling and modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l3.errors import WorkloadError
from l3.report.summary import summarize
from l3.sim.simulator import Simulator
from l3.specs.model import get_model
from l3.specs.system import ParallelSpec, get_system
from l3.workload import WORKLOAD_NAMES, Workload, load_workload
from l3.workload.registry import TRACE_FILES, find_data_dir
from l3.workload.synthetic import SYNTHETIC


def _data_dir() -> Path | None:
    try:
        return find_data_dir()
    except WorkloadError:
        return None


DATA_DIR = _data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None, reason="trace data dir (shared/data/traces or $L3_DATA_DIR) not found"
)

# Rows in each file, from the data folders' README files.
TRACE_ROWS = {
    "azure-code": 8819,
    "azure-conv": 19366,
    "mooncake-conversation": 12031,
    "mooncake-synthetic": 3993,
    "sharegpt": 30731,
    "arxiv": 28257,
    "bwb": 33768,
}


def _check_valid(w: Workload) -> None:
    assert w.arrival_s.dtype == np.float64
    assert w.prompt_len.dtype == np.int64 and w.output_len.dtype == np.int64
    assert len(w.arrival_s) == len(w.prompt_len) == len(w.output_len) == len(w)
    assert w.arrival_s[0] >= 0 and np.all(np.diff(w.arrival_s) >= 0)
    assert w.prompt_len.min() >= 1 and w.output_len.min() >= 1
    assert sum(w.refused_reasons.values()) == w.rows_refused


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- named workloads -----------------------------------------------------------------------------------


def test_every_name_is_listed() -> None:
    assert set(TRACE_ROWS) == set(TRACE_FILES)
    assert set(SYNTHETIC) | set(TRACE_FILES) | {"default", "azure-conv-sample", "fixed:P:O"} == set(WORKLOAD_NAMES)


@needs_data
@pytest.mark.parametrize("name", sorted(TRACE_ROWS))
def test_named_trace_loads_with_readme_row_count(name: str) -> None:
    w = load_workload(name)
    _check_valid(w)
    assert len(w) + w.rows_refused == TRACE_ROWS[name]
    timestamped = name.startswith(("azure", "mooncake"))
    assert w.mode == ("online" if timestamped else "offline")
    assert (w.prefix_blocks is not None) == name.startswith("mooncake")
    assert w.source.startswith(str(DATA_DIR))


@needs_data
def test_trace_units() -> None:
    code = load_workload("azure-code")  # README: 18:17:03 -> 19:14:19, about 57 minutes
    assert code.arrival_s[0] == 0.0 and 3400 < code.arrival_s[-1] < 3460
    conv = load_workload("mooncake-conversation")  # README: timestamps 0 -> 3,536,999 ms
    assert conv.arrival_s[-1] == pytest.approx(3536.999)
    assert all(len(b) == -(-p // 512) for b, p in zip(conv.prefix_blocks, conv.prompt_len, strict=True))


def test_builtin_sample_needs_no_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("L3_DATA_DIR", str(tmp_path / "missing"))
    w = load_workload("azure-conv-sample")
    _check_valid(w)
    assert len(w) == 2000 and w.mode == "online" and w.arrival_s[0] == 0.0
    assert w.prompt_len[:2].tolist() == [374, 396] and w.output_len[:2].tolist() == [44, 109]
    assert load_workload("default").source == load_workload("openr1").source
    with pytest.raises(WorkloadError, match=r"L3_DATA_DIR|missing"):
        load_workload("azure-conv")


def test_data_dir_without_the_file(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"AzureLLMInferenceTrace_code\.csv not found"):
        load_workload("azure-code", data_dir=tmp_path)


def test_unknown_name() -> None:
    with pytest.raises(WorkloadError, match="unknown workload 'nope'"):
        load_workload("nope")


# --- synthetic sets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_moments_match_targets(name: str) -> None:
    spec = SYNTHETIC[name]
    w = load_workload(name, n_requests=100_000, seed=1)
    _check_valid(w)
    assert w.mode == "offline" and np.all(w.arrival_s == 0)
    for x, mean, std in (
        (w.prompt_len, spec.prompt_mean, spec.prompt_std),
        (w.output_len, spec.output_mean, spec.output_std),
    ):
        assert x.mean() == pytest.approx(mean / spec.divisor, rel=0.05)
        assert x.std() == pytest.approx(std / spec.divisor, rel=0.10)
    assert (w.prompt_len + w.output_len).max() <= 131072
    assert "seed=1" in w.source and "n=100000" in w.source


def test_synthetic_defaults_and_dolphin_short() -> None:
    assert len(load_workload("openr1")) == 1000
    full, short = load_workload("dolphin-r1", seed=3), load_workload("dolphin-short", seed=3)
    assert np.array_equal(short.prompt_len, np.maximum((full.prompt_len + 5) // 10, 1))
    assert np.array_equal(short.output_len, np.maximum((full.output_len + 5) // 10, 1))


@pytest.mark.parametrize("name", ["openthoughts", "sharegpt", "azure-conv-sample"])
def test_determinism_per_seed(name: str) -> None:
    if name == "sharegpt" and DATA_DIR is None:
        pytest.skip("trace data dir not found")
    kw = {"n_requests": 500, "mode": "online", "arrival_rate": 4.0}
    a, b, c = (load_workload(name, seed=s, **kw) for s in (7, 7, 8))
    for field in ("arrival_s", "prompt_len", "output_len"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.arrival_s, c.arrival_s)
    if name != "azure-conv-sample":  # a trace prefix does not depend on the seed
        assert not np.array_equal(a.prompt_len, c.prompt_len)


def test_arrival_rate_keeps_lengths() -> None:
    a = load_workload("openr1", seed=2, arrival_rate=1.0)
    b = load_workload("openr1", seed=2, arrival_rate=50.0)
    assert np.array_equal(a.prompt_len, b.prompt_len) and np.allclose(a.arrival_s, 50.0 * b.arrival_s)
    assert a.mode == "online" and len(a) / a.arrival_s[-1] == pytest.approx(1.0, rel=0.1)


# --- malformed files -----------------------------------------------------------------------------------

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ROW = "2023-11-16 18:17:03.9799600,4808,10\n"


@pytest.mark.parametrize(
    ("fname", "text", "needles"),
    [
        (
            "bad_int.csv",
            AZURE_HEADER + ROW * 3 + "2023-11-16 18:17:05.0,12,abc\n",
            ["line 5", "GeneratedTokens", "'abc'"],
        ),
        (
            "frac.csv",
            "num_prefill_tokens,num_decode_tokens\n5,6\n7,1.5\n",
            ["line 3", "num_decode_tokens", "1.5"],
        ),
        ("bad_ts.csv", AZURE_HEADER + ROW + "yesterday,5,6\n", ["line 3", "TIMESTAMP", "'yesterday'"]),
        (
            "short_row.csv",
            "arrival_s,prompt_len,output_len\n0,1,1\n\n1,2\n",
            ["line 4", "2 fields; expected 3"],
        ),
        ("missing.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9,5\n", ["line 1", "GeneratedTokens"]),
        ("unknown.csv", "a,b\n1,2\n", ["line 1", "unrecognised header"]),
        ("empty.csv", "", ["empty"]),
        ("header_only.csv", AZURE_HEADER, ["no request rows"]),
        (
            "bad.jsonl",
            '{"timestamp": 0, "input_length": 5, "output_length": 3}\n\n{"timestamp": 1, "input_length": 5\n',
            ["line 3", "not valid JSON"],
        ),
        (
            "bad_field.jsonl",
            '{"timestamp": 0, "input_length": 5, "output_length": "x"}\n',
            ["line 1", "output_length"],
        ),
        ("no_field.jsonl", '{"timestamp": 0, "input_length": 5}\n', ["line 1", "output_length"]),
        (
            "bad_hash.jsonl",
            '{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": [0]}\n'
            '{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": [1, -2]}\n',
            ["line 2", "hash_ids"],
        ),
    ],
)
def test_malformed_file_names_file_line_and_field(
    tmp_path: Path, fname: str, text: str, needles: list[str]
) -> None:
    path = _write(tmp_path, fname, text)
    with pytest.raises(WorkloadError) as err:
        load_workload(str(path))
    message = str(err.value)
    assert fname in message and "\n" not in message
    for needle in needles:
        assert needle in message


# --- impossible rows -----------------------------------------------------------------------------------


def test_impossible_rows_are_counted(tmp_path: Path) -> None:
    rows = ["0,5,6", "1,0,6", "2,5,0", "-1,5,6", "3,-4,0", "2.5,7,8"]
    path = _write(tmp_path, "t.csv", "arrival_s,prompt_len,output_len\n" + "\n".join(rows) + "\n")
    w = load_workload(str(path))
    _check_valid(w)
    assert len(w) + w.rows_refused == len(rows)
    assert w.refused_reasons == {"prompt_len < 1": 2, "output_len < 1": 1, "arrival_s < 0": 1}
    assert w.arrival_s.tolist() == [0.0, 2.5] and w.describe()["rows_refused"] == 4


def test_refused_rows_survive_sampling_reach_the_summary_and_strict_refuses_them(tmp_path: Path) -> None:
    rows = ["0,5,6", "1,0,6", "2,5,0", "-1,5,6", "2.5,7,8"]
    path = _write(tmp_path, "t.csv", "arrival_s,prompt_len,output_len\n" + "\n".join(rows) + "\n")
    w = load_workload(str(path), n_requests=1)  # a sample of the kept rows still says what the file lost
    assert len(w) == 1 and w.rows_refused == 3
    dep = get_system("gpu-only").deploy(get_model("llama-2-7b"), ParallelSpec(tp=1, dp=8))
    s = summarize(Simulator(dep, load_workload(str(path))).run())
    assert s["requests_total"] == 2
    assert s["rows_refused"] == {"count": 3, "reasons": {"prompt_len < 1": 1, "output_len < 1": 1,
                                                         "arrival_s < 0": 1}}  # fmt: skip
    with pytest.raises(WorkloadError, match=r"3 rows refused as impossible .*strict"):
        load_workload(str(path), strict=True)


def test_a_length_beyond_2_to_53_is_an_error_not_a_cast(tmp_path: Path) -> None:
    path = _write(tmp_path, "h.csv", "arrival_s,prompt_len,output_len\n0,1e20,5\n")
    with pytest.raises(WorkloadError, match=r"h.csv line 2, column prompt_len: expected an integer below 2\^53"):
        load_workload(str(path))


def test_azure_zero_generated_tokens_counted(tmp_path: Path) -> None:
    path = _write(tmp_path, "z.csv", AZURE_HEADER + ROW + "2023-11-16 18:17:04.0,3180,0\n")
    w = load_workload(str(path))
    assert len(w) == 1 and w.refused_reasons == {"output_len < 1": 1}


def test_out_of_order_timestamps_are_sorted(tmp_path: Path) -> None:
    path = _write(tmp_path, "o.csv", "arrival_s,prompt_len,output_len\n5,1,1\n2,2,2\n5,3,3\n")
    w = load_workload(str(path))
    assert w.arrival_s.tolist() == [2, 5, 5] and w.prompt_len.tolist() == [2, 1, 3]


# --- selection, tiling, modes --------------------------------------------------------------------------


def test_first_n_in_arrival_order() -> None:
    full, head = load_workload("azure-conv-sample"), load_workload("azure-conv-sample", n_requests=10)
    assert np.array_equal(head.arrival_s, full.arrival_s[:10]) and "first 10" in head.source


def test_tiling_gives_exactly_n_in_order() -> None:
    base = load_workload("azure-conv-sample")
    w = load_workload("azure-conv-sample", n_requests=4500)
    _check_valid(w)
    assert len(w) == 4500 and "tiled 3x" in w.source
    assert np.array_equal(w.prompt_len, np.tile(base.prompt_len, 3)[:4500])
    period = base.arrival_s[-1] * (1 + 1 / (len(base) - 1))
    assert w.arrival_s[2000] == pytest.approx(period)
    whole = load_workload("azure-conv-sample", n_requests=6000)  # whole copies keep the mean gap exactly
    assert np.diff(whole.arrival_s).mean() == pytest.approx(np.diff(base.arrival_s).mean(), rel=1e-9)


def test_tiling_offsets_prefix_blocks(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 1000 * i, "input_length": 600, "output_length": 2, "hash_ids": [0, i + 1]}
        for i in range(3)
    ]
    path = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines))
    w = load_workload(str(path), n_requests=7)
    _check_valid(w)
    assert len(w) == 7 and w.arrival_s.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert [b.tolist() for b in w.prefix_blocks[2:4]] == [[0, 3], [4, 5]]


def test_tiling_a_length_set(tmp_path: Path) -> None:
    path = _write(tmp_path, "l.csv", "num_prefill_tokens,num_decode_tokens\n1,2\n3,4\n")
    w = load_workload(str(path), n_requests=5)
    assert w.prompt_len.tolist() == [1, 3, 1, 3, 1] and w.mode == "offline"


@needs_data
def test_length_set_sample_is_seeded_and_distinct() -> None:
    w = load_workload("bwb", n_requests=1000, seed=4)
    assert len(w) == 1000 and "seeded sample" in w.source
    assert not np.array_equal(w.prompt_len, load_workload("bwb", n_requests=1000, seed=5).prompt_len)


def test_modes() -> None:
    off = load_workload("azure-conv-sample", n_requests=100, mode="offline")
    assert off.mode == "offline" and np.all(off.arrival_s == 0)
    on = load_workload("azure-conv-sample", n_requests=100)
    fast = load_workload("azure-conv-sample", n_requests=100, rate_scale=4.0)
    assert np.allclose(fast.arrival_s * 4.0, on.arrival_s)
    with pytest.raises(WorkloadError, match="arrival_rate"):
        load_workload("openr1", mode="online")
    with pytest.raises(WorkloadError, match="online mode"):
        load_workload("openr1", mode="offline", arrival_rate=2.0)
    for bad in ({"rate_scale": 0.0}, {"arrival_rate": -1.0}, {"n_requests": 0}, {"seed": -1}, {"mode": "x"}):
        with pytest.raises(WorkloadError):
            load_workload("openr1", **bad)


def test_workload_arrays_are_read_only() -> None:
    w = load_workload("openr1", n_requests=10)
    with pytest.raises(ValueError):
        w.prompt_len[0] = 5


# --- round trip ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False),
            st.integers(min_value=1, max_value=2**40),
            st.integers(min_value=1, max_value=2**40),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_simple_csv_round_trip(tmp_path_factory: pytest.TempPathFactory, rows: list) -> None:
    path = tmp_path_factory.mktemp("rt") / "rt.csv"
    path.write_text("arrival_s,prompt_len,output_len\n" + "".join(f"{a!r},{p},{o}\n" for a, p, o in rows))
    w = load_workload(str(path))
    expected = sorted(rows, key=lambda r: r[0])  # stable: equal arrivals keep file order
    assert w.arrival_s.tolist() == [r[0] for r in expected]
    assert w.prompt_len.tolist() == [r[1] for r in expected]
    assert w.output_len.tolist() == [r[2] for r in expected]
    assert w.rows_refused == 0 and w.mode == "online"


def test_fixed_length_workload_for_context_sweeps():
    w = load_workload("fixed:8192:512", n_requests=7)
    assert len(w) == 7 and set(w.prompt_len) == {8192} and set(w.output_len) == {512} and w.mode == "offline"
    for bad in ("fixed:abc", "fixed:0:5", "fixed:131072:1"):
        with pytest.raises(WorkloadError, match="fixed"):
            load_workload(bad)
