"""The `l3` command: outputs, required summary fields, and one-line errors with non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED = ["throughput_tok_s", "requests_completed", "requests_rejected", "mean_batch_size", "ttft_p50_s",
            "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "simulated_time_s", "wall_time_s", "model", "system",
            "workload", "steady_throughput_tok_s", "t50_output_s", "t90_output_s", "bound_tok_s", "bound_fraction",
            "time_breakdown", "parallelism", "parallelism_candidates", "energy_j", "energy_j_per_token",
            "energy_breakdown_j"]  # fmt: skip


def l3(*args, check=True):
    proc = subprocess.run([sys.executable, "-c", "from l3.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_simulate_writes_summary_csv_and_plots(tmp_path):
    out = tmp_path / "run"
    l3("simulate", "--system", "gpu-only", "--model", "llama-3-8b", "--workload", "dolphin-short",
       "--requests", "40", "--out", str(out))  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    for key in REQUIRED:
        assert key in s, key
    assert s["requests_completed"] + s["requests_rejected"] == 40
    assert s["throughput_tok_s"] > 0
    assert s["parallelism"]["rule"] == "auto" and len(s["parallelism_candidates"]) == 4  # TP 1, 2, 4, 8
    chosen = [c for c in s["parallelism_candidates"] if c["status"].startswith("chosen")]
    assert [(c["tp"], c["dp"]) for c in chosen] == [(s["deployment"]["tp"], s["deployment"]["dp"])]
    lines = (out / "requests.csv").read_text().splitlines()
    assert len(lines) == 41 and lines[0].startswith("id,arrival_s")
    for png in ("batch_throughput.png", "timeline.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    parts = s["wall_time_parts_s"]  # the whole command, its parts listed
    assert {"start_up", "load_workload", "choose_parallelism", "simulate", "write_outputs"} == set(parts)
    assert s["wall_time_s"] == pytest.approx(sum(parts.values())) and min(parts.values()) >= 0


@pytest.mark.slow
def test_builtin_sample_trace_online(tmp_path):
    out = tmp_path / "run"
    l3("simulate", "--model", "llama-2-7b", "--workload", "azure-conv-sample", "--requests", "50",
       "--parallelism", "2x4", "--out", str(out))  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["workload_mode"] == "online" and s["requests_completed"] + s["requests_rejected"] == 50
    assert s["parallelism"] == {"rule": "given", "tp": 2, "dp": 4}


def test_list_shows_presets():
    text = l3("list").stdout
    for name in ("opt-66b", "qwen-72b", "gpt-175b", "a100-80gb", "gpu-only", "openr1", "ddr4-3200"):
        assert name in text


@pytest.mark.parametrize(
    "args, needle",
    [(["simulate", "--model", "nope"], "unknown model"),
     (["simulate", "--system", "nope"], "unknown system"),
     (["simulate", "--workload", "nope"], "nope"),
     (["simulate", "--parallelism", "4by2"], "expected auto, paper or TPxDP"),
     (["simulate", "--model", "llama-2-7b", "--parallelism", "paper"], "the paper gives TP/DP only for"),
     (["simulate", "--parallelism", "5x1"], "tp = 5 must divide the model's n_heads")],
)  # fmt: skip
def test_errors_are_one_line_without_traceback(args, needle):
    proc = l3(*args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr


def test_pim_json_has_required_fields():
    import json as _json

    out = _json.loads(l3("pim", "--model", "qwen-72b", "--context", "4096", "--batch", "16", "--json",
                         "--no-ablate").stdout)  # fmt: skip
    for key in ("capacity_bytes", "peak_attention_bw_bytes_per_s", "effective_attention_bw_bytes_per_s", "n_hc",
                "step_attention_time_s", "breakdown"):  # fmt: skip
        assert key in out, key
    assert out["n_hc"] == 1 and 12e12 < out["peak_attention_bw_bytes_per_s"] < 14e12
    assert out["energy_j"] == pytest.approx(sum(out["energy_breakdown_j"].values()))
    assert out["energy_j_per_token"] == pytest.approx(out["energy_j"] / 16)
    assert abs(sum(out["breakdown"].values()) - out["step_attention_time_s"]) <= 1e-9 * out["step_attention_time_s"]


def test_pim_needs_a_pim_system():
    proc = l3("pim", "--system", "gpu-only", check=False)
    assert proc.returncode != 0 and "no [pim] section" in proc.stderr


@pytest.mark.slow
def test_compare_writes_one_summary_per_system(tmp_path):
    import json as _json

    out = tmp_path / "cmp"
    text = l3("compare", "--systems", "gpu-only,l3,cpu-offload", "--model", "llama-3-8b", "--workload",
              "dolphin-short", "--requests", "30", "--out", str(out)).stdout  # fmt: skip
    assert "speedup" in text
    results = _json.loads((out / "compare.json").read_text())
    assert [r["system"] for r in results] == ["gpu-only", "l3", "cpu-offload"]
    assert [r["attention_model"] for r in results] == ["mechanism", "mechanism", "ideal"]  # said per system
    for r in results:
        for key in REQUIRED:
            assert key in r, key
        assert r["requests_completed"] + r["requests_rejected"] == 30
    assert results[0]["speedup"] == 1.0
    for r in results:  # energy columns: tokens per joule is the reciprocal of joules per token
        assert r["tokens_per_j"] == pytest.approx(1 / r["energy_j_per_token"])
    assert "J/token" in text and "tokens/J" in text
    assert (out / "compare.csv").read_text().count("\n") == 4
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_study_writes_report_and_figure(tmp_path):
    l3("study", "capacity", "--requests", "12", "--out", str(tmp_path), "--jobs", "1")
    report = (tmp_path / "capacity" / "report.md").read_text()
    assert "| DIMMs |" in report and "l3 study capacity" in report
    assert report.count("of 32") == 4
    assert (tmp_path / "capacity" / "capacity.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_study_is_a_clear_error(tmp_path):
    proc = l3("study", "nope", "--out", str(tmp_path), check=False)
    assert proc.returncode != 0 and "unknown study" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_tbt_study_tables_every_system(tmp_path):
    l3("study", "tbt", "--out", str(tmp_path))
    report = (tmp_path / "tbt" / "report.md").read_text()
    for name in ("gpu-only", "hbm-pim", "hbm-pim-ext", "r-pim", "cpu-offload", "l3"):
        assert name in report
    assert report.count("### context") == 3 and (tmp_path / "tbt" / "tbt.png").exists()


def test_out_is_checked_before_any_work(tmp_path, capsys):
    """An --out that is a file or cannot be written is a one-line error (exit 2) before the run starts."""
    a_file = tmp_path / "summary"
    a_file.write_text("")
    cases = [(["simulate", "--requests", "3"], a_file, "expected a folder"),
             (["simulate", "--requests", "3"], Path("/proc/no/such/dir"), "cannot write there"),
             (["compare", "--requests", "3"], a_file, "expected a folder"),
             (["study", "tbt"], a_file, "expected a folder")]  # fmt: skip
    from l3.cli import main

    for cmd, out, expect in cases:  # in this process: the check must come before any simulation
        with pytest.raises(SystemExit) as exit_, pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["l3", *cmd, "--out", str(out)])
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and expect in err and "Traceback" not in err, err


def test_compare_strict_refuses_a_trace_with_impossible_rows_before_running(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_len,output_len\n0,5,6\n1,0,6\n")
    proc = l3("compare", "--systems", "gpu-only", "--model", "llama-2-7b", "--workload", str(trace), "--strict",
              "--out", str(tmp_path / "c"), check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "1 rows refused as impossible" in proc.stderr + proc.stdout
    assert not (tmp_path / "c" / "compare.json").exists()


def test_sweep_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "l3"\n')
    for args, needle in ((("sweep", str(bad)), "models: Field required"),
                         (("sweep", "report"), "needs the sweep's Parquet file"),
                         (("sweep", "report", str(tmp_path / "none.parquet")), "no such file"),
                         (("sweep", "spec.json"), "expected a sweep spec (.toml)")):  # fmt: skip
        proc = l3(*args, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
