"""Spec validation: presets are consistent, impossible specs fail early naming the field."""

from __future__ import annotations

import json

import pytest

from conftest import make_workload
from l3.errors import SpecError
from l3.run import deploy
from l3.sched.requests import Status
from l3.sim.simulator import Simulator
from l3.specs.dram import DramSpec, get_org, get_timing
from l3.specs.model import MODEL_PRESETS, ModelSpec, get_model
from l3.specs.system import ParallelSpec, SystemSpec, builtin_system_names, get_system, with_overrides
from l3.workload import load_workload

PAPER_MODELS = {"opt-66b": (64, 72, 72, 9216), "qwen-72b": (80, 64, 8, 8192), "gpt-175b": (96, 96, 96, 12288)}


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_model_shapes(name):
    m = get_model(name)
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_model) == PAPER_MODELS[name]
    assert m.head_dim == 128


def test_parameter_counts_match_public_sizes():
    # Public sizes (billions) of the real checkpoints; our count must be within 3%.
    for name, billions in {"llama-2-7b": 6.74, "llama-2-70b": 68.98, "llama-3-8b": 8.03, "gpt-175b": 175.0,
                           "opt-66b": 65.7, "llama-2-13b": 13.0}.items():  # fmt: skip
        assert abs(MODEL_PRESETS[name].n_params / 1e9 - billions) / billions < 0.03, name


def test_kv_bytes_per_token():
    m = get_model("opt-66b")
    assert m.kv_bytes_per_token == 2 * 64 * 9216 * 2


@pytest.mark.parametrize(
    "change, field",
    [({"n_kv_heads": 96}, "n_kv_heads"), ({"n_layers": 0}, "n_layers"), ({"n_kv_heads": 7}, "n_heads")],
)
def test_impossible_model_names_field(change, field):
    data = get_model("llama-2-7b").model_dump() | change
    with pytest.raises(SpecError, match=field):
        ModelSpec.build(data)


def test_hf_config_llama_and_opt(tmp_path):
    llama = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "torch_dtype": "bfloat16",
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(llama))
    m = get_model(str(p))
    assert (m.n_kv_heads, m.head_dim, m.ffn_kind, m.gqa_group) == (2, 16, "gated", 2)
    opt = {"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "ffn_dim": 256, "vocab_size": 100}  # fmt: skip
    p.write_text(json.dumps(opt))
    assert get_model(str(tmp_path)).ffn_kind == "plain"
    p.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SpecError, match="model_type"):
        get_model(str(p))
    p.write_text("{ not json")
    with pytest.raises(SpecError, match="line 1"):
        get_model(str(p))
    del llama["hidden_size"]
    p.write_text(json.dumps(llama))
    with pytest.raises(SpecError, match="hidden_size"):
        get_model(str(p))


def test_all_builtin_systems_deploy_paper_models_at_the_papers_parallelism():
    for name in builtin_system_names():
        for s in get_system(name).tier_variants():
            for m in PAPER_MODELS:
                assert s.parallelism_for(get_model(m))[0] == "auto"  # shipped files choose by probe
                dep = s.deploy(get_model(m), "paper")
                assert (dep.tp, dep.dp, dep.rule) == (*{"opt-66b": (2, 4), "qwen-72b": (4, 2), "gpt-175b": (8, 1)}[m],
                                                      "paper")  # fmt: skip


def test_parallelism_rules(tmp_path):
    s = get_system("gpu-only")
    with pytest.raises(SpecError, match='"auto" for opt-66b: the TP/DP is chosen by probing'):
        s.deploy(get_model("opt-66b"))
    with pytest.raises(SpecError, match="the paper gives TP/DP only for"):
        s.deploy(get_model("llama-2-7b"), "paper")
    table = SystemSpec.build(s.model_dump() | {"parallelism": {"default": "paper", "llama-2-7b": {"tp": 2, "dp": 4}}})
    assert (table.deploy(get_model("qwen-72b")).tp, table.deploy(get_model("qwen-72b")).rule) == (4, "paper")
    assert (table.deploy(get_model("llama-2-7b")).dp, table.deploy(get_model("llama-2-7b")).rule) == (4, "fixed")
    # every candidate uses all 8 GPUs; those the model cannot use say why
    cands = {(p.tp, p.dp): why for p, why in s.parallel_candidates(get_model("gpt-175b"))}
    assert list(cands) == [(1, 8), (2, 4), (4, 2), (8, 1)]
    assert cands[(8, 1)] is None and "do not fit" in cands[(4, 2)]
    six = with_overrides(get_system("l3"), {"pim": {"org_overrides": {"channels": 6}}})
    assert "dp = 8 must divide pim channels = 6" in six.parallel_candidates(get_model("llama-2-7b"))[0][1]


def _edited(tmp_path, text_from, text_to):
    from importlib import resources

    src = (resources.files("l3.data.systems") / "gpu-only.toml").read_text()
    assert text_from in src
    p = tmp_path / "edited.toml"
    p.write_text(src.replace(text_from, text_to))
    return p


def test_impossible_systems_fail_naming_the_field(tmp_path):
    with pytest.raises(SpecError, match="count"):
        get_system(str(_edited(tmp_path, "count = 8", "count = 0")))
    auto = 'default = "auto"'
    with pytest.raises(SpecError, match=r"parallelism\.gpt-175b: tp = 5 must divide"):
        get_system(str(_edited(tmp_path, auto, auto + "\ngpt-175b = { tp = 5, dp = 1 }"))).deploy(get_model("gpt-175b"))
    with pytest.raises(SpecError, match="do not fit"):
        get_system(str(_edited(tmp_path, auto, auto + "\ngpt-175b = { tp = 2, dp = 4 }"))).deploy(get_model("gpt-175b"))
    with pytest.raises(SpecError, match=r"= 16 GPUs, but gpu\.count = 8"):
        get_system(str(_edited(tmp_path, auto, auto + "\nopt-66b = { tp = 2, dp = 8 }"))).deploy(get_model("opt-66b"))
    with pytest.raises(SpecError, match=r"= 6 GPUs, but gpu\.count = 8; expected a TP x DP that uses every GPU"):
        get_system(str(_edited(tmp_path, auto, auto + "\nopt-66b = { tp = 3, dp = 2 }"))).deploy(get_model("opt-66b"))
    with pytest.raises(SpecError, match="parallelism"):
        get_system(str(_edited(tmp_path, auto, 'default = "best"')))
    with pytest.raises(SpecError, match="unknown GPU"):
        get_system(str(_edited(tmp_path, 'preset = "a100-80gb"', 'preset = "z9000"')))
    with pytest.raises(SpecError, match="invalid TOML"):
        get_system(str(_edited(tmp_path, "[links]", "[links")))
    with pytest.raises(SpecError, match="unknown system"):
        get_system("no-such-system")


def test_dram_derived_capacity_and_bandwidth():
    spec = DramSpec(timing=get_timing("ddr4-3200"), org=get_org("ddr4-l3-2tb"))
    assert spec.org.capacity_bytes == 2 * 2**40
    assert spec.org.banks == 8192 and spec.org.ranks == 64
    assert spec.channel_peak_bw == pytest.approx(25.6e9)
    assert spec.external_peak_bw == pytest.approx(409.6e9)
    with pytest.raises(SpecError, match="channels"):
        from l3.specs.dram import DramOrg

        DramOrg.build(get_org("ddr4-l3-2tb").model_dump() | {"channels": 0})


@pytest.mark.parametrize("system, old, new, field", [
    ("cpu-offload", 'cpu = "epyc-7742-x2"', 'cpu = "epyc-9999"', "unknown CPU"),
    ("hbm-pim-mech", "stacks = 40", "stacks = 40\nccd_l = 1", r"ccd_l \(1\) must be >= ccd_s"),
    ("hbm-pim-mech", "stacks = 40", "stacks = 0", "stacks must be > 0"),
    ("hbm-pim-mech", 'variant = "mechanism"', 'variant = "mechanism"\ncpu = "epyc-7742-x2"', "either cpu or hbm"),
])  # fmt: skip
def test_baseline_devices_fail_naming_the_field(tmp_path, system, old, new, field):
    from importlib import resources

    text = (resources.files("l3.data.systems") / f"{system}.toml").read_text()
    assert old in text
    path = tmp_path / f"{system}.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(SpecError, match=field):
        get_system(str(path))


def test_a_tier_left_to_the_probe_is_chosen_by_it():
    """l3-plus leaves its HBM KV tier to the probe: deploying the file itself is refused with the reason, its two
    variants deploy, and `l3.run.deploy` probes both at a fixed parallelism and records the choice."""
    spec = get_system("l3-plus")
    with pytest.raises(SpecError, match='asymmetric = "auto" is chosen by probing'):
        spec.deploy(get_model("llama-3-8b"), ParallelSpec(tp=4, dp=2))
    assert [v.coordination.asymmetric for v in spec.tier_variants()] == [True, False]
    wl = load_workload("openr1", n_requests=40, seed=0)
    dep = deploy(spec, get_model("llama-3-8b"), wl, parallel=ParallelSpec(tp=4, dp=2))
    rows = dep.selection["candidates"]
    assert sorted(r["asymmetric"] for r in rows) == [False, True]
    assert all(r["probe_steady_tok_s"] is not None for r in rows)
    assert dep.system.coordination.asymmetric == dep.selection["asymmetric"] in (True, False)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"model_type": "llama", "num_attention_heads": 0, "hidden_size": 4096}, "'num_attention_heads' is 0"),
    ({"model_type": "llama", "num_attention_heads": 32, "hidden_size": "4096"}, "'hidden_size' is '4096'"),
    ({"model_type": "llama", "num_attention_heads": 30, "hidden_size": 4096}, "not a multiple"),
    ({"model_type": "llama", "num_attention_heads": 32, "hidden_size": 4096, "num_key_value_heads": 0,
      "num_hidden_layers": 2, "intermediate_size": 8, "vocab_size": 8}, "'num_key_value_heads' is 0"),
    ({"model_type": "llama", "num_attention_heads": 32, "hidden_size": 4096, "num_hidden_layers": True},
     "'num_hidden_layers' is True"),
    ({"model_type": "llama", "num_attention_heads": 32, "hidden_size": 4096, "torch_dtype": "int4"},
     "'torch_dtype' is 'int4'"),
])  # fmt: skip
def test_bad_hf_configs_are_spec_errors_naming_the_field(tmp_path, cfg, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match=match) as exc:
        get_model(str(path))
    assert str(path) in str(exc.value)


def test_a_config_whose_top_level_is_not_an_object_is_a_spec_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(SpecError, match="top level is a JSON list"):
        get_model(str(path))


def test_requests_beyond_the_context_window_are_rejected_with_a_reason(tmp_path):
    cfg = {"model_type": "llama", "num_attention_heads": 8, "hidden_size": 1024, "num_hidden_layers": 2,
           "intermediate_size": 2048, "vocab_size": 1000, "max_position_embeddings": 4096}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    model = get_model(str(path))
    assert model.max_context == 4096 and get_model("opt-66b").max_context is None
    dep = get_system("gpu-only").deploy(model, ParallelSpec(tp=1, dp=8))
    wl = make_workload([0.0, 0.0, 0.0], [100, 4000, 4096], [10, 96, 1], mode="offline")
    res = Simulator(dep, wl).run()
    t = res.table
    assert list(t.status) == [Status.DONE, Status.DONE, Status.REJECTED]
    assert t.reject_code[2] == "exceeds_context_window" and "at most 4096" in t.reject_reason[2]


@pytest.mark.parametrize(("line", "match"), [
    ("memory_util = -0.85", "memory_util: Input should be greater than 0"),
    ("memory_util = 1.7", "memory_util: Input should be less than or equal to 1"),
    ("compute_util = 0", "compute_util: Input should be greater than 0"),
    ("tile_m = 0", "tile_m: Extra inputs are not permitted"),
])  # fmt: skip
def test_gpu_model_parameters_out_of_range_are_spec_errors(tmp_path, line, match):
    from importlib import resources

    key = line.split(" = ")[0]
    src = (resources.files("l3.data.systems") / "gpu-only.toml").read_text().splitlines()
    text = "\n".join(ln for ln in src if not ln.startswith(f"{key} ="))  # the file's own value out
    text = text.replace("[gpu.model]", f"[gpu.model]\n{line}", 1)
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(SpecError, match=match) as exc:
        get_system(str(f))
    assert str(f) in str(exc.value)


@pytest.mark.parametrize(("old", "new", "match"), [
    ('preset = "a100-80gb"', 'preset = "a100-90gb"', "gpu: unknown GPU 'a100-90gb'"),
    ('nvlink = "nvlink3"', 'nvlink = "nvlink9"', "links: unknown link 'nvlink9'"),
    ("# org_overrides = { channels = 8 }", "org_overrides = { channels = 0 }", "pim: org_overrides: invalid DramOrg"),
])  # fmt: skip
def test_unknown_presets_and_bad_overrides_name_the_file(tmp_path, old, new, match):
    from importlib import resources

    src = (resources.files("l3.data.systems") / "l3.toml").read_text()
    assert old in src
    f = tmp_path / "edited.toml"
    f.write_text(src.replace(old, new))
    with pytest.raises(SpecError, match=match) as exc:
        get_system(str(f))
    assert str(f) in str(exc.value)


def test_platform_presets_beyond_the_paper():
    from l3.specs.dram import get_org
    from l3.specs.hardware import get_gpu, get_link

    b200, h100 = get_gpu("b200"), get_gpu("h100-sxm")
    assert b200.hbm_bw > 2 * h100.hbm_bw and b200.l2_bytes > 2 * h100.l2_bytes
    assert b200.flop_j == (b200.tdp_w - b200.idle_w) / b200.peak_flops
    assert get_link("nvlink5").bw == 2 * get_link("nvlink4").bw
    assert 110e9 < get_link("pcie6-x16").bw < 128e9  # 64 GT/s x 16 lanes, FLIT overhead
    ddr5 = get_org("ddr5-32gb-x8-12dimm")
    assert ddr5.dimms == 12 and ddr5.channels == 24  # two subchannels per DIMM
    assert get_org("ddr4-l3-2tb").dimms == 32
