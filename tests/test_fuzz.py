"""Fuzzed input files (tests/fuzz.py): every loader returns a valid result or the project's error, never another
exception, and never loses a row or a request. A bounded run here; bench/fuzz_loaders.py runs longer."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from fuzz import check_config, check_system, check_trace, csv_traces, hf_configs, jsonl_traces, system_files

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(trace=csv_traces())
def test_fuzzed_csv_traces(tmp_path, trace):
    text, rows = trace
    path = tmp_path / "trace.csv"
    path.write_text(text)
    check_trace(path, rows)


@FUZZ
@given(trace=jsonl_traces())
def test_fuzzed_jsonl_traces(tmp_path, trace):
    text, rows = trace
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    check_trace(path, rows)


@FUZZ
@given(text=hf_configs())
def test_fuzzed_model_configs(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    check_config(path)


@FUZZ
@given(text=system_files())
def test_fuzzed_system_files(tmp_path, text):
    path = tmp_path / "system.toml"
    path.write_text(text)
    check_system(path)
