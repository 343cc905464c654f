"""The `l3` command line: simulate a system, list presets, inspect the PIM device."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from l3.errors import L3Error

app = typer.Typer(add_completion=False, no_args_is_help=True, help="L3: GPU + DIMM-PIM LLM inference.")
# Piped output (files, CI logs) gets wide tables rather than rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 150)


def _fmt(x, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _parallel_note(s: dict) -> str:
    """How TP/DP were chosen, with the probe's figures of an automatic choice."""
    p = s["parallelism"]
    tier = "" if "asymmetric" not in p else f"; HBM KV tier {'on' if p['asymmetric'] else 'off'} (probed)"
    if p["rule"] != "auto" or not p.get("probe_requests"):
        return {"paper": "the paper's", "fixed": "fixed in the system file", "given": "given"}.get(
            p["rule"], "auto: the only candidate") + tier
    probed = [c for c in s["parallelism_candidates"] if c["probe_steady_tok_s"] is not None]
    figs = ", ".join(f"TP{c['tp']}{'' if 'asymmetric' not in c else ('+HBM' if c['asymmetric'] else '')} "
                     f"{c['probe_steady_tok_s']:.0f}" for c in probed)  # fmt: skip
    return f"auto, probe of {p['probe_requests']} requests, steady tok/s: {figs}{tier}"


def _losses(breakdown: dict) -> str:
    """The largest causes of time beyond the bound, as shares of the replicas' time."""
    from l3.report.summary import largest_losses

    return ", ".join(f"{k} {v:.0%}" for k, v in largest_losses(breakdown, 4, 0.005)) or "-"


def _wall(s: dict) -> str:
    """The command's wall time and its parts, e.g. "91.2 s (load workload 0.0 s, simulate 32.1 s, ...)"."""
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in s["wall_time_parts_s"].items())
    return f"{_fmt(s['wall_time_s'], ' s')} ({parts})"


def print_summary(s: dict) -> None:
    t = Table(
        title=f"{s['system']} · {s['model']} · {s['workload']} ({s['workload_mode']})", show_header=False
    )
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    dep = s["deployment"]
    rows = [
        ("GPUs / parallelism", f"{dep['gpu']}, TP{dep['tp']} x DP{dep['dp']} ({_parallel_note(s)})"),
        ("decode attention model", s.get("attention_model", "mechanism")),
        ("requests completed / rejected", f"{s['requests_completed']} / {s['requests_rejected']}"),
        ("output throughput (all requests / makespan)", _fmt(s["throughput_tok_s"], " tok/s", 4)),
        ("steady-state throughput (10%-90% of output)", _fmt(s["steady_throughput_tok_s"], " tok/s", 4)),
        ("50% / 90% of output tokens out at", f"{_fmt(s['t50_output_s'], ' s')} / {_fmt(s['t90_output_s'], ' s')}"),
        ("hardware bound on these batches", f"{_fmt(s['bound_tok_s'], ' tok/s', 4)} "
                                            f"({_pct(s['bound_fraction'])} reached; "
                                            f"{_pct(s['steady_bound_fraction'])} in the steady state)"),
        ("time beyond the bound", _losses(s["time_breakdown"])),
        ("mean batch size (per replica)", _fmt(s["mean_batch_size"])),
        ("TTFT p50 / p99", f"{_fmt(s['ttft_p50_s'], ' s')} / {_fmt(s['ttft_p99_s'], ' s')}"),
        ("TBT p50 / p90 / p99",
         f"{_fmt(s['tbt_p50_s'], ' s')} / {_fmt(s['tbt_p90_s'], ' s')} / {_fmt(s['tbt_p99_s'], ' s')}"),
        ("end-to-end p50 / p99", f"{_fmt(s['e2e_p50_s'], ' s')} / {_fmt(s['e2e_p99_s'], ' s')}"),
        ("preemptions", str(s["preemptions"])),
        ("KV capacity per replica", f"{s['kv_capacity_tokens_per_replica']:,} tokens"),
        ("busy fraction", ", ".join(f"{d} {v:.1%}" for d, v in s["busy_fraction"].items())),
        ("simulated time", _fmt(s["simulated_time_s"], " s", 5)),
        ("wall time (measured)", _wall(s)),
    ]  # fmt: skip
    if s["reject_reasons"]:
        rows.insert(2, ("rejection reasons", ", ".join(f"{k}: {v}" for k, v in s["reject_reasons"].items())))
    refused = s["rows_refused"]
    if refused["count"]:
        rows.insert(2, ("trace rows refused", f"{refused['count']} ("
                        + ", ".join(f"{k}: {v}" for k, v in refused["reasons"].items()) + ")"))
    if "policy" in s:  # systems with a memory-side attention device

        def err(e: dict) -> str:
            return "-" if e["median"] is None else f"{e['median']:.1%} / {e['p90']:.1%} (n={e['n']})"

        rows[-2:-2] = [
            ("scheduler policy", str(s["policy"])),
            ("rank load imbalance (slowest / mean working)", _fmt(s["rank_load_imbalance"])),
            ("... by PIM decodes per sub-batch (share of layers)",
             ", ".join(f"{k}: {v['imbalance']:.2f} ({v['layer_share']:.0%})"
                       for k, v in s["rank_load_imbalance_by_device_decodes"].items()) or "-"),
            ("PIM predictor error, median / p90", err(s["pim_predictor_error"])),
            ("GPU predictor error, median / p90", err(s["gpu_predictor_error"])),
            ("iterations where GPU / PIM waited", f"{s['gpu_waited_fraction']:.0%} / {s['pim_waited_fraction']:.0%}"),
        ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if refused["count"]:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {refused['count']} rows of the trace were refused as "
                                   "impossible and are not in the run (--strict makes this an error)")  # fmt: skip
    console.print(f"[dim]workload: {s['workload_source']}[/dim]")
    console.print(f"[dim]{s['what_is_simulated']}[/dim]")


@app.command()
def simulate(
    system: Annotated[str, typer.Option(help="system name (see `l3 list`) or a .toml file")] = "l3",
    model: Annotated[str, typer.Option(help="model preset or a Hugging Face config.json")] = "opt-66b",
    workload: Annotated[str, typer.Option(help="workload name (see `l3 list`) or a trace file")] = "default",
    requests: Annotated[
        int | None, typer.Option(help="number of requests (default: all / 1000 synthetic)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for synthetic lengths, sampling and arrivals")] = 0,
    mode: Annotated[str | None, typer.Option(help="offline (all at t=0) or online (trace arrivals)")] = None,
    rate_scale: Annotated[float, typer.Option(help="online: multiply the trace's request rate")] = 1.0,
    arrival_rate: Annotated[float | None, typer.Option(help="online: Poisson arrivals, requests/s")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for summary.json, CSVs and plots")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the real traces")] = None,
    parallelism: Annotated[str | None, typer.Option(
        help="auto (probe every TP x DP), paper (the paper's TP/DP) or TPxDP such as 4x2; default: the file's")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="a trace row refused as impossible is an error")] = False,
    jobs: Annotated[int | None, typer.Option(
        min=1, help="processes probing TP x DP candidates side by side (default: the CPUs available)")] = None,
) -> None:
    """Serve a workload on a system and report throughput, latency and utilisation."""
    import time

    t_start = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from l3.parallel import available_cpus
    from l3.report.summary import summarize
    from l3.run import Stopwatch, deploy, parse_parallel
    from l3.sim.simulator import Simulator
    from l3.specs.model import get_model
    from l3.specs.system import get_system
    from l3.workload import load_workload

    if out is not None:  # the file writers (pandas, matplotlib) are loaded only when there is something to write
        from l3.report.files import prepare_out, write_run

        prepare_out(out)
    wall = Stopwatch()
    wall.parts["start_up"] = time.perf_counter() - t_start  # the imports above included
    par = parse_parallel(parallelism)
    with wall.part("load_workload"):
        wl = load_workload(workload, n_requests=requests, seed=seed, mode=mode, rate_scale=rate_scale,
                           arrival_rate=arrival_rate, data_dir=data_dir, strict=strict)  # fmt: skip
    with console.status("choosing TP x DP"), wall.part("choose_parallelism"):
        dep = deploy(get_system(system), get_model(model), wl, seed, par, jobs or available_cpus())
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar, wall.part("simulate"):  # fmt: skip
        task = bar.add_task("simulating", total=len(wl))
        res = Simulator(dep, wl).run(progress=lambda n: bar.update(task, completed=n))
    summary = write_run(res, out, wall) if out is not None else summarize(res, wall.parts)
    print_summary(summary)
    if out is not None:
        console.print(
            f"wrote {out}/summary.json, requests.csv, timeline.csv, batch_throughput.png, timeline.png"
        )


@app.command("compare")
def compare_cmd(
    systems: Annotated[str, typer.Option(help="comma-separated system names or .toml files")] = "gpu-only,l3,l3-plus",
    model: Annotated[str, typer.Option(help="model preset or a Hugging Face config.json")] = "opt-66b",
    workload: Annotated[str, typer.Option(help="workload name or trace file")] = "default",
    requests: Annotated[int | None, typer.Option(help="number of requests (default: all / 1000 synthetic)")] = None,
    seed: Annotated[int, typer.Option(help="seed for synthetic lengths, sampling and arrivals")] = 0,
    mode: Annotated[str | None, typer.Option(help="offline or online")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for compare.json, compare.csv, compare.png")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="parallel processes")] = 2,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the real traces")] = None,
    parallelism: Annotated[str | None, typer.Option(
        help="for every system: auto, paper or TPxDP such as 4x2; default: each file's")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="a trace row refused as impossible is an error")] = False,
) -> None:
    """Run several systems on the same workload and compare them in one table."""
    from l3.report.compare import compare, write_compare
    from l3.report.files import prepare_out
    from l3.run import parse_parallel

    if out is not None:
        prepare_out(out)
    par = parse_parallel(parallelism)
    names = [s.strip() for s in systems.split(",") if s.strip()]
    with console.status(f"simulating {len(names)} systems"):
        results = compare(names, model, workload, requests, seed, mode, data_dir, jobs, par, strict)
    r0 = results[0]
    t = Table(title=f"{r0['model']} · {r0['workload']} ({r0['workload_mode']}, {r0['requests_total']} requests)"
                    " - simulated")  # fmt: skip
    common = "common_requests" in r0
    cols = ["system", "attention", "TPxDP", "tok/s total", "steady", "speedup", "bound (reached)", "batch",
            "TBT p50/p99 s", "rej.", "KV GiB", "attn TB/s", "J/token", "tokens/J"]  # fmt: skip
    if common:
        cols[6:6] = [f"common steady ({r0['common_requests']} req.)", "common speedup"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("system", "attention") else "right", no_wrap=col == "system")
    for r in results:
        oom = f"OOM ({r['requests_rejected']} rej.)" if r["requests_rejected"] else None
        row = [r["system"], r["attention_model"], f"{r['tp']}x{r['dp']}", f"{r['throughput_tok_s']:.1f}",
               _fmt(r["steady_throughput_tok_s"], "", 4), oom or _ratio(r["speedup"]),
               f"{_fmt(r['bound_tok_s'], '', 4)} ({_pct(r['bound_fraction'])})", f"{r['mean_batch_size']:.1f}",
               f"{_fmt(r['tbt_p50_s'])}/{_fmt(r['tbt_p99_s'])}", str(r["requests_rejected"]),
               f"{r['kv_capacity_bytes'] / 2**30:,.0f}", f"{r['attention_peak_bw_bytes_per_s'] / 1e12:.1f}",
               _fmt(r["energy_j_per_token"], "", 3), _fmt(r["tokens_per_j"], "", 3)]
        if common:
            row[6:6] = [_fmt(r["common_steady_throughput_tok_s"], "", 4), _ratio(r["common_speedup"])]
        t.add_row(*row)
    console.print(t)
    console.print(f"[dim]tok/s total: output tokens / makespan; steady: output tokens/s between the times 10% and "
                  f"90% of the output was out; speedup: steady over {r0['speedup_baseline']}, none where either "
                  "rejected requests (OOM); bound: the hardware's throughput on the batches each run executed "
                  "(share reached); " + ("common: every system re-run on the requests all of them served, at its "
                  "TP x DP; " if common else "") + "KV: capacity for KV over all replicas; attn: peak bandwidth "
                  "decode attention reads the KV at; attention: ideal = at that peak (the paper's idealisation), "
                  "mechanism = from the device's mechanisms; J/token: the run's energy (every device, static power "
                  "over the makespan included; docs/energy.md) per output token[/dim]")  # fmt: skip
    if out is not None:
        write_compare(results, out)
        console.print(f"wrote {out}/compare.json, compare.csv, compare.png")


@app.command()
def study(
    name: Annotated[str, typer.Argument(help="main | main-mech | capacity | scaling | ablation | tbt | long-context "
                                             "| energy | platforms")],
    out: Annotated[Path, typer.Option(help="directory for report.md, results.json and figures")] = Path("out/study"),
    requests: Annotated[int, typer.Option(min=1, help="requests per run (the paper uses 1000)")] = 1000,
    jobs: Annotated[int, typer.Option(min=1, help="parallel processes")] = 2,
) -> None:
    """Run one of the paper's studies and write a Markdown report with figures."""
    from l3.report.files import prepare_out
    from l3.report.study import run_study

    target = prepare_out(prepare_out(out) / name)
    with console.status(f"running study {name}"):
        path = run_study(name, target, requests, jobs)
    console.print(f"wrote {path}")


@app.command()
def pim(
    system: Annotated[str, typer.Option(help="a system with a [pim] section, or a .toml file")] = "l3",
    model: Annotated[str, typer.Option(help="model preset or a Hugging Face config.json")] = "opt-66b",
    context: Annotated[int, typer.Option(min=1, help="tokens attended per request")] = 8192,
    batch: Annotated[int, typer.Option(min=1, help="decode requests in the step")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    ablate: Annotated[bool, typer.Option(help="also time the step with each hardware fix disabled")] = True,
    area: Annotated[bool, typer.Option("--area", help="also the PUs' area and its growth with GQA reuse")] = False,
) -> None:
    """The DIMM-PIM device: capacity, bandwidth, one decode step's attention time and energy by mechanism."""
    import json

    from l3.devices.pim.area import area_sweep, pim_area
    from l3.devices.pim.report import ablation, pim_report
    from l3.errors import SpecError
    from l3.specs.model import get_model
    from l3.specs.system import get_system

    spec = get_system(system)
    if spec.pim is None:
        raise SpecError(f"system {spec.name!r} has no [pim] section; try --system l3")
    dram, m = spec.pim.dram(), get_model(model)
    rep = pim_report(dram, spec.pim.pu, m, context, batch)
    if ablate:
        rep["ablation"] = ablation(dram, spec.pim.pu, m, context, batch)
    if area:
        rep["area"] = pim_area(dram, spec.pim.pu)
        rep["area_by_gqa_reuse"] = area_sweep(dram, spec.pim.pu)
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    t = Table(title=f"DIMM-PIM of {spec.name} · {m.name} · {batch} x {context} tokens (simulated)", show_header=False)
    t.add_column("quantity", style="bold")
    t.add_column("value", justify="right")
    t.add_row("organisation", f"{rep['dram']}, {dram.org.ranks} ranks, {dram.org.banks:,} banks")
    t.add_row("capacity", f"{rep['capacity_bytes'] / 2**40:.2f} TiB = {rep['kv_capacity_tokens']:,} tokens of KV")
    t.add_row("chips per KV head (N_hc)", str(rep["n_hc"]))
    t.add_row("peak attention read bandwidth", f"{rep['peak_attention_bw_bytes_per_s'] / 1e12:.2f} TB/s")
    t.add_row("effective attention bandwidth", f"{rep['effective_attention_bw_bytes_per_s'] / 1e12:.2f} TB/s")
    t.add_row("one step's attention (slowest rank)", f"{rep['step_attention_time_s'] * 1e3:.3f} ms")
    t.add_row("one step's energy (whole device)", f"{rep['energy_j'] * 1e3:.2f} mJ = "
              f"{rep['energy_j_per_token'] * 1e3:.3f} mJ per token, {rep['energy_j_per_kv_byte'] * 1e12:.1f} pJ per "
              "KV byte")  # fmt: skip
    console.print(t)
    b = Table(title="where the time goes (slowest rank, all layers)")
    for col in ("mechanism", "ms", "share", "what it is"):
        b.add_column(col)
    total = rep["step_attention_time_s"]
    for k, v in rep["breakdown"].items():
        if v > 0:
            b.add_row(k, f"{v * 1e3:.3f}", f"{v / total:.1%}", rep["mechanisms"][k])
    console.print(b)
    en = Table(title="where the energy goes (whole device, one step)")
    for col in ("component", "mJ", "share", "what it is"):
        en.add_column(col)
    for k, v in rep["energy_breakdown_j"].items():
        if v > 0:
            en.add_row(k, f"{v * 1e3:.3f}", f"{v / rep['energy_j']:.1%}", rep["energy_components"][k])
    console.print(en)
    if area:
        a = rep["area"]
        ar = Table(title=f"area the PUs add (mm^2; DRAM die {a['die_mm2']:.0f} mm^2, assumed)")
        for col in ("GQA reuse (N_cmr)", "MAC lanes / bank", "bank PU", "shared buffer", "per chip",
                    "of a die", "rank PU (buffer chip)"):  # fmt: skip
            ar.add_column(col, justify="right")
        for r in rep["area_by_gqa_reuse"]:
            mark = " (this spec)" if r["gqa_reuse_max"] == spec.pim.pu.bank_pu.gqa_reuse_max else ""
            ar.add_row(f"{r['gqa_reuse_max']}{mark}", str(r["mac_lanes_per_bank"]), f"{r['bank_pu_mm2']:.3f}",
                       f"{r['shared_buffer_mm2']:.3f}", f"{r['chip_mm2']:.2f}", f"{r['die_fraction']:.1%}",
                       f"{r['rank_pu_mm2']:.2f}")  # fmt: skip
        console.print(ar)
    if ablate:
        a = Table(title="hardware fixes disabled one at a time")
        for col in ("fix disabled", "step (ms)", "slowdown", "prefill KV write (s)", "mechanism"):
            a.add_column(col)
        for r in rep["ablation"]:
            a.add_row(r["fix_disabled"], f"{r['step_attention_time_s'] * 1e3:.3f}", f"{r['slowdown']:.2f}x",
                      f"{r['prefill_write_time_s']:.3f}", r["mechanism"])
        console.print(a)


def _engine_imports() -> None:
    """The engine needs torch and transformers (the `engine` extra); say so in one line if they are missing."""
    from l3.errors import EngineError

    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise EngineError("the engine needs PyTorch and transformers: pip install -e '.[engine]'") from None


def _check_backend(backend: str) -> None:
    """A bad --backend fails at once, before the engine's imports and the model's load."""
    from l3.engine import BACKEND_NAMES
    from l3.errors import EngineError

    if backend not in BACKEND_NAMES:
        raise EngineError(f"--backend {backend!r}: expected one of {', '.join(BACKEND_NAMES)}")


def _load_for_engine(model: str, backend: str, dtype: str):
    """(the loaded model, its dense device)."""
    import torch

    from l3.engine.loader import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with console.status(f"loading {model}"):
        return load_model(model, dtype=dtype, device=device), device


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt (an instruct model's chat template is applied)")],
    model: Annotated[str, typer.Option(help="a model folder (config.json + safetensors), a .gguf file, or smollm2")]
    = "smollm2",
    backend: Annotated[str, typer.Option(help="where decode attention runs: cpu, pim or gpu")] = "cpu",
    max_tokens: Annotated[int, typer.Option(min=1, help="new tokens at most")] = 128,
    kv_tokens: Annotated[int, typer.Option(min=16, help="KV cache capacity, tokens")] = 16384,
    dtype: Annotated[str, typer.Option(help="weights and activations: float32, float16 or bfloat16")] = "float32",
    raw: Annotated[bool, typer.Option("--raw", help="feed the prompt as is, without the chat template")] = False,
    temperature: Annotated[float, typer.Option(min=0, help="0 is greedy; above, sampled")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="nucleus: the most likely tokens up to this mass")]
    = 1.0,
    seed: Annotated[int | None, typer.Option(help="fixes the sampled tokens")] = None,
) -> None:
    """Generate with the real engine (greedy unless --temperature), streaming text to the terminal."""
    _check_backend(backend)
    _engine_imports()
    from l3.engine.engine import Engine
    from l3.engine.sampling import SamplingParams
    from l3.engine.text import TextStream
    from l3.errors import EngineError

    lm, device = _load_for_engine(model, backend, dtype)
    tok = lm.tokenizer
    if tok is None:
        raise EngineError(f"model {model}: no tokenizer in its folder; expected tokenizer files beside config.json")
    if not raw and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
    else:
        ids = tok(prompt)["input_ids"]
    engine = Engine(lm, backend=backend, kv_tokens=kv_tokens)
    stop = [t for t in (tok.eos_token_id,) if t is not None]
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    engine.add_request(ids, max_tokens, stop_ids=stop, sampling=sampling)
    text = TextStream(tok)
    for _, token in engine.stream():
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    policy = engine.scheduler.report().get("policy", "one batch")
    Console(stderr=True).print(f"[dim]{len(text.tokens)} tokens, {engine.iterations} iterations, backend {backend} "
                               f"on {device}, {len(ids)} prompt tokens; scheduler: {policy}[/dim]")  # fmt: skip


@app.command("bench-engine")
def bench_engine(
    model: Annotated[str, typer.Option(help="a model folder, a .gguf file, or smollm2")] = "smollm2",
    new_tokens: Annotated[int, typer.Option(min=1, help="new tokens per request")] = 64,
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8,32",
    backends: Annotated[str, typer.Option(help="comma-separated engine backends")] = "cpu,gpu",
    repeats: Annotated[int, typer.Option(min=1, help="rounds per batch size (medians are reported)")] = 3,
) -> None:
    """Benchmark the engine against transformers generate, and the cpu backend against DRAM bandwidth."""
    _engine_imports()
    import torch

    from l3.engine import bench
    from l3.engine.loader import load_model
    from l3.errors import EngineError

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise EngineError(f"--batches {batches!r}: expected whole numbers separated by commas, e.g. 1,8,32") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with console.status(f"loading {model}"):
        lm = load_model(model, device=device)
    with console.status("measuring (transformers generate and the engine, side by side)"):
        res = bench.run(lm, sizes, new_tokens, tuple(b.strip() for b in backends.split(",")), repeats)
    t = Table(title=f"{res['model']} on {device}: decode, {new_tokens} new tokens per request (measured; medians "
                    f"of {repeats} rounds)")  # fmt: skip
    for col in ("batch", "backend", "engine tok/s", "transformers tok/s", "speedup (range)",
                "PIM-side pred. err. (med)", "GPU-side pred. err. (med)"):  # fmt: skip
        t.add_column(col, justify="right")
    for r in res["rows"]:
        pe, ge = r["pim_predictor_error"] or {}, r["gpu_predictor_error"] or {}
        t.add_row(str(r["batch"]), r["backend"], f"{r['engine_tok_s']:.1f}", f"{r['transformers_tok_s']:.1f}",
                  f"{r['speedup']:.2f}x ({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f})",
                  _pct(pe.get("median")), _pct(ge.get("median")))  # fmt: skip
    console.print(t)
    bw = res["cpu_attention_bw_bytes_per_s"] / 1e9
    lo, hi = res["cpu_attention_bw_fraction_range"]
    console.print(f"cpu attention backend, 32K-token fp16 KV (8 KV heads x 128): {bw:.1f} GB/s = "
                  f"{res['cpu_attention_bw_fraction']:.0%} of this machine's DRAM read bandwidth "
                  f"({res['dram_read_bw_bytes_per_s']/1e9:.1f} GB/s, measured in the same round; median of "
                  f"{repeats} rounds, {lo:.0%}-{hi:.0%})")  # fmt: skip
    console.print(f"dense forms chosen on this machine (weight rows x columns, row bucket): {res['dense_forms']}")


def _serve_imports() -> None:
    """The server needs the `serve` extra as well as the engine's; say so in one line if it is missing."""
    from l3.errors import EngineError

    _engine_imports()
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EngineError("the server needs FastAPI, uvicorn and prometheus-client: pip install -e '.[serve]'") \
            from None


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="a model folder (config.json + safetensors), a .gguf file, or smollm2")]
    = "smollm2",
    backend: Annotated[str, typer.Option(help="where decode attention runs: cpu, pim or gpu")] = "cpu",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
    kv_tokens: Annotated[int, typer.Option(min=16, help="KV cache capacity, tokens")] = 16384,
    dtype: Annotated[str, typer.Option(help="weights and activations: float32, float16 or bfloat16")] = "float32",
    max_waiting: Annotated[int, typer.Option(min=1, help="requests waiting for admission before new ones get 429")]
    = 256,
    max_batched_tokens: Annotated[int | None, typer.Option(min=1, help="tokens per iteration, decodes + prefill "
                                                           "chunks (default: the system's, 2048)")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the model id clients use (default: the model's name)")]
    = None,
) -> None:
    """Serve the engine over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics)."""
    _check_backend(backend)
    _serve_imports()
    import uvicorn

    from l3.engine.engine import Engine
    from l3.engine.server.app import create_app

    lm, device = _load_for_engine(model, backend, dtype)
    name = served_model_name or Path(model).stem
    engine = Engine(lm, backend=backend, kv_tokens=kv_tokens, max_batched_tokens=max_batched_tokens)
    api = create_app(engine, name, max_waiting)
    console.print(f"serving [bold]{name}[/bold] (backend {backend} on {device}) at http://{host}:{port}/v1")
    uvicorn.run(api, host=host, port=port, log_level="warning")


@app.command()
def loadtest(
    url: Annotated[str, typer.Option(help="the server's base URL (this machine only)")] = "http://127.0.0.1:8000",
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at a time")] = 4,
    requests: Annotated[int, typer.Option(min=1, help="requests to send")] = 32,
    workload: Annotated[str, typer.Option(help="whose prompt and output lengths to replay (see `l3 list`)")]
    = "azure-conv-sample",
    max_seconds: Annotated[float, typer.Option(help="wall-time bound; unfinished requests are cancelled")] = 600.0,
    seed: Annotated[int, typer.Option(help="seeds the requests' choice and their prompt tokens")] = 0,
    out: Annotated[Path | None, typer.Option(help="also write the summary as JSON to this file")] = None,
) -> None:
    """Replay a workload's lengths against a running `l3 serve`; print throughput and TTFT/TBT percentiles."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from l3.engine.server.loadtest import check_url, run_loadtest

    url = check_url(url)  # before the progress bar shows
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:  # fmt: skip
        task = bar.add_task("requests", total=None)
        res = run_loadtest(url, workload, concurrency, requests, max_seconds, seed,
                           on_start=lambda n: bar.update(task, total=n),
                           on_done=lambda: bar.advance(task))  # fmt: skip
    t = Table(title=f"{res['model']} at {res['url']} · {res['workload']} lengths · concurrency {concurrency} "
                    "(measured by the client)", show_header=False)  # fmt: skip
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    def ms(d: dict) -> str:
        return " / ".join("-" if d[k] is None else f"{d[k] * 1e3:.3g} ms" for k in ("p50", "p99"))

    for k, v in (
        ("requests completed / failed / unfinished", f"{res['completed']} / {res['failed']} / {res['unfinished']}"),
        ("scaled to the server's context", f"{res['scaled_to_context']} (context {res['context']} tokens)"),
        ("prompt / output tokens", f"{res['prompt_tokens']} / {res['output_tokens']}"),
        ("wall time", _fmt(res["wall_s"], " s")),
        ("output throughput", _fmt(res["throughput_tok_s"], " tok/s", 4)),
        ("requests per second", _fmt(res["requests_per_s"])),
        ("TTFT p50 / p99", ms(res["ttft_s"])),
        ("TBT p50 / p99", ms(res["tbt_s"])),
        ("latency p50 / p99", ms(res["latency_s"])),
    ):
        t.add_row(k, v)
    console.print(t)
    if res["first_error"]:
        console.print(f"[red]first error:[/red] {res['first_error']}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))


@app.command()
def sweep(
    target: Annotated[str, typer.Argument(help="a sweep spec (.toml) to run, or `report`")],
    results: Annotated[Path | None, typer.Argument(help="with `report`: the sweep's Parquet file")] = None,
    out: Annotated[Path | None, typer.Option(help="running: the Parquet file (default out/sweeps/SPEC.parquet); "
                                                  "report: its directory (default beside the results)")] = None,
    address: Annotated[str | None, typer.Option(help="a Ray cluster (default: RAY_ADDRESS, else a local instance)")]
    = None,
    jobs: Annotated[int | None, typer.Option(min=1, help="CPUs of the local Ray instance (default: all)")] = None,
) -> None:
    """Run a design-space sweep on Ray (docs/sweeps.md), or write the report of one (`l3 sweep report FILE`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from l3.errors import SpecError

    if target == "report":
        from l3.sweep.report import sweep_report

        if results is None:
            raise SpecError("l3 sweep report needs the sweep's Parquet file: l3 sweep report RESULTS.parquet")
        path = sweep_report(results, out or results.with_name(results.stem + "-report"))
        console.print(f"wrote {path}")
        return
    from l3.sweep.run import import_ray, run_sweep
    from l3.sweep.spec import load_sweep

    spec_path = Path(target)
    if spec_path.suffix != ".toml":
        raise SpecError(f"{target}: expected a sweep spec (.toml) or `report`")
    spec = load_sweep(spec_path)
    points = spec.points()
    import_ray()  # say how to install it before anything runs
    out = out or Path("out/sweeps") / f"{spec_path.stem}.parquet"
    failed = 0
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:  # fmt: skip
        task = bar.add_task(f"{len(points)} points", total=len(points))

        def done(row: dict) -> None:
            nonlocal failed
            failed += row["status"] != "ok"
            bar.update(task, advance=1, description=f"{len(points)} points, {failed} failed")

        counts = run_sweep(spec, out, address, jobs, on_result=done,
                           on_start=lambda c: bar.update(task, completed=c["skipped"]))  # fmt: skip
    console.print(f"{counts['points']} points: {counts['skipped']} already in {out}, {counts['ok']} ran, "
                  f"{counts['failed']} failed; wrote {out} (l3 sweep report {out})")


@app.command("list")
def list_presets() -> None:
    """Show the presets: models, GPUs, CPUs, links, DRAM, systems and workloads."""
    from l3.specs.dram import ORG_PRESETS, TIMING_PRESETS
    from l3.specs.hardware import CPU_PRESETS, GPU_PRESETS, LINK_PRESETS
    from l3.specs.model import MODEL_PRESETS
    from l3.specs.system import builtin_system_names, get_system
    from l3.workload import WORKLOAD_NAMES

    t = Table(title="models")
    for col in ("name", "layers", "d_model", "heads (q/kv)", "FFN", "params", "KV/token"):
        t.add_column(col)
    for m in MODEL_PRESETS.values():
        t.add_row(
            m.name,
            str(m.n_layers),
            str(m.d_model),
            f"{m.n_heads}/{m.n_kv_heads}",
            f"{m.ffn_dim} {m.ffn_kind}",
            f"{m.n_params / 1e9:.1f} B",
            f"{m.kv_bytes_per_token / 1e6:.3f} MB",
        )
    console.print(t)
    t = Table(title="GPUs, CPUs and links")
    for col in ("name", "peak", "memory", "source"):
        t.add_column(col)
    for g in GPU_PRESETS.values():
        t.add_row(
            g.name,
            f"{g.peak_flops / 1e12:.0f} TFLOP/s, {g.hbm_bw / 1e12:.2f} TB/s",
            f"{g.hbm_bytes / 2**30:.0f} GiB",
            g.source,
        )
    for lk in LINK_PRESETS.values():
        t.add_row(lk.name, f"{lk.bw / 1e9:.1f} GB/s/dir", "", lk.source)
    for c in CPU_PRESETS.values():
        t.add_row(c.name, f"{c.peak_flops / 1e12:.1f} TFLOP/s FP32 ({c.cores} cores), {c.peak_bw / 1e9:.1f} GB/s",
                  f"{c.memory_bytes / 2**30:.0f} GiB {c.memory}", c.source)  # fmt: skip
    console.print(t)
    t = Table(title="DRAM presets")
    t.add_column("name")
    t.add_column("facts")
    for tm in TIMING_PRESETS.values():
        t.add_row(tm.name, f"timing, tCK {tm.tck_ns:.4g} ns, {tm.data_rate_mts:.0f} MT/s")
    for o in ORG_PRESETS.values():
        t.add_row(o.name, f"organisation, {o.channels} ch, {o.ranks} ranks, {o.banks} banks, "
                          f"{o.capacity_bytes / 2**30:.0f} GiB")  # fmt: skip
    console.print(t)
    t = Table(title="systems")
    t.add_column("name")
    t.add_column("description")
    for name in builtin_system_names():
        t.add_row(name, get_system(name).description)
    console.print(t)
    t = Table(title="workloads")
    t.add_column("name")
    t.add_column("description")
    for name, desc in WORKLOAD_NAMES.items():
        t.add_row(name, desc)
    console.print(t)


def main() -> None:
    try:
        app(standalone_mode=False)
    except L3Error as exc:
        from rich.text import Text

        Console(stderr=True).print(Text("error: ", style="red") + Text(str(exc)), soft_wrap=True, highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:
        # Usage errors and exits of the (possibly vendored) click layer carry their own message and code.
        if hasattr(exc, "exit_code"):
            if hasattr(exc, "show"):
                exc.show()
            sys.exit(exc.exit_code)
        raise
