"""The real engine: greedy tokens identical to transformers `generate` (tiny random Llama, Qwen2, Mistral and OPT
models; SmolLM2-135M, slow), through preemption, on every attention backend; the cpu backend's attention against
a float64 reference; one-line errors for bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)  # the suite runs on one xdist worker per core: more threads per worker only contend

from l3.engine import dense, host_kernel  # noqa: E402
from l3.engine.attention import PIECE_TOKENS, merge, partial_attention  # noqa: E402
from l3.engine.engine import Engine  # noqa: E402
from l3.engine.loader import load_model  # noqa: E402
from l3.engine.sampling import SamplingParams  # noqa: E402
from l3.errors import EngineError  # noqa: E402
from l3.sched.subbatch import SubBatchScheduler  # noqa: E402

TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024)
OPT = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
           max_position_embeddings=1024, word_embed_proj_dim=32)  # fmt: skip
CONFIGS = {  # GQA (llama, qwen2 with Q/K/V biases), one KV head and a sliding window (mistral), MHA (opt)
    "llama": lambda: transformers.LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, intermediate_size=128, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**TINY, intermediate_size=128, num_key_value_heads=1,
                                                  sliding_window=48),
    "opt": lambda: transformers.OPTConfig(**OPT),
}
LENGTHS = (3, 17, 40, 1, 90, 8, 33, 5)  # mixed prompt lengths, served in one continuous batch


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """family -> loaded random-weight model (saved as config.json + safetensors, loaded as a user's folder)."""
    out = {}
    for family, make in CONFIGS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        transformers.AutoModelForCausalLM.from_config(make()).save_pretrained(folder)
        out[family] = load_model(str(folder))
    return out


def reference(model, prompts, new_tokens):
    """transformers' greedy `generate`, one prompt at a time (no padding), never stopping early."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                pad_token_id=0)  # fmt: skip
        out.append(gen[0, len(p) :].tolist())
    return out


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in LENGTHS]


CASES = [  # the functional PIM model takes ~20 s a family at 64 tokens: its full cases run with the slow tests
    pytest.param(b, f, marks=pytest.mark.slow) if b == "pim" and f != "mistral" else (b, f)
    for b in ("gpu", "cpu", "pim") for f in CONFIGS
]  # fmt: skip


@pytest.mark.parametrize("backend, family", CASES)
def test_greedy_tokens_equal_transformers_generate(tiny_models, family, backend):
    if backend == "pim" and family == "qwen2":
        pytest.skip("the PIM arithmetic does not depend on the family: GQA (llama) and MHA (opt) cover it")
    model = tiny_models[family]
    prompts = prompts_for(300)
    engine = Engine(model, backend=backend, kv_tokens=8192)
    if backend == "pim" and family == "mistral":  # the PIM kernels have no sliding window: refused, not wrong
        with pytest.raises(EngineError, match="sliding window of 48 tokens"):
            engine.generate(prompts, 64)
        return
    assert engine.generate(prompts, 64) == reference(model, prompts, 64)
    if backend == "pim":  # each step also says what the DIMM-PIM device model would take
        assert engine.pim_simulated_s > 0
    if backend != "gpu":  # the memory-side backends run under L3's sub-batch scheduler, trained on measured times
        assert isinstance(engine.scheduler, SubBatchScheduler) and engine.scheduler.gpu_pred.seen > 0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_interleaved_forward_gives_each_sub_batch_its_own_forward(tiny_models, family):
    """Two sub-batches interleaved layer by layer (one's attention between the other's dense work) give the
    logits of two separate forwards bit for bit, with every piece of work timed."""
    from l3.engine.link import HostLink

    model = tiny_models[family]
    runner, rng = Engine(model, backend="cpu").runner, np.random.default_rng(1)
    batches = []
    for n in (7, 3):
        tokens = torch.from_numpy(rng.integers(3, 300, n))
        batches.append((tokens, torch.arange(n), torch.tensor([n - 1])))

    def attend_causally(n):  # a prefill chunk attending its own keys (no KV store needed)
        def attention(layer, q, k, v):
            mask = torch.ones(n, n, dtype=torch.bool).tril()
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0),
                v.transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0), attn_mask=mask,
                scale=runner.scale).transpose(0, 1)  # fmt: skip

        return attention

    attentions = [attend_causally(len(b[0])) for b in batches]
    res = runner.forward_pair(batches, attentions, HostLink())
    for (tokens, positions, last), attention, got in zip(batches, attentions, res.logits, strict=True):
        assert torch.equal(got, runner.forward(tokens, positions, attention, last))
    assert all(t > 0 for t in res.dense_s + res.attention_s)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_overlapped_sub_batches_give_the_reference_tokens(tiny_models, family, monkeypatch):
    """The engine with overlap forced on (on a CPU it gains nothing, but runs the same interleaved path a GPU
    does): the scheduler splits iterations into two sub-batches, each attended by its own view of the backend,
    and the tokens stay transformers'."""
    model = tiny_models[family]
    prompts = prompts_for(300, seed=4)
    engine = Engine(model, backend="cpu", kv_tokens=8192, overlap=True)
    pairs = []
    run_pair = engine._run_pair
    monkeypatch.setattr(engine, "_run_pair", lambda *a: pairs.append(1) or run_pair(*a))
    assert engine.generate(prompts, 24) == reference(model, prompts, 24)
    assert len(pairs) >= 2, pairs  # iterations ran as two interleaved sub-batches
    with pytest.raises(EngineError, match="overlap needs a memory-side"):
        Engine(model, backend="gpu", overlap=True)


@pytest.mark.parametrize("form", ["linear", "transposed", "gemv"])
def test_every_pinned_dense_form_gives_the_reference_tokens(tiny_models, form, monkeypatch):
    monkeypatch.setenv(dense.PIN, form)
    model = tiny_models["qwen2"]  # Q/K/V biases
    prompts = prompts_for(300, seed=2)
    assert Engine(model, backend="gpu", kv_tokens=8192).generate(prompts, 16) == reference(model, prompts, 16)


@given(n=st.integers(1, 2 * dense.TALL_CHUNK + 300), k=st.integers(1, 96), rows=st.integers(1, dense.FEW_ROWS),
       bias=st.booleans(), seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_every_dense_form_matches_float64(n, k, rows, bias, seed):
    gen = np.random.default_rng(seed)
    mod = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        mod.weight.copy_(torch.from_numpy(gen.standard_normal((n, k))))
        if bias:
            mod.bias.copy_(torch.from_numpy(gen.standard_normal(n)))
    x = torch.from_numpy(gen.standard_normal((rows, k))).float()
    want = x.double() @ mod.weight.double().T + (mod.bias.double() if bias else 0.0)
    served = 0
    with torch.inference_mode():
        for name, form in dense.FORMS.items():
            got = form(mod, x)
            if got is None:
                assert name == "gemv" and (rows > 1 or not host_kernel.available())
                continue
            served += 1
            assert got.shape == (rows, n), name
            assert float((got.double() - want).abs().max()) <= 1e-5 * max(1.0, k**0.5), name
    assert served >= 2  # linear and transposed always


def test_the_fastest_measured_dense_form_serves_its_row_bucket(monkeypatch):
    calls = {"linear": 0, "transposed": 0}
    transposed = dense.FORMS["transposed"]

    def slow_linear(mod, x):  # the form to lose
        calls["linear"] += 1
        time.sleep(0.002)
        return mod(x)

    def counted_transposed(mod, x):
        calls["transposed"] += 1
        return transposed(mod, x)

    forms = {"linear": slow_linear, "transposed": counted_transposed}
    monkeypatch.setattr(dense, "FORMS", forms)
    monkeypatch.setattr(dense.DenseForms, "chosen", {})
    monkeypatch.delenv(dense.PIN, raising=False)
    mods = [torch.nn.Linear(16, 24) for _ in range(3)]
    runner = dense.DenseForms(mods)
    x = torch.randn(5, 16)
    with torch.inference_mode():
        got = runner.linear(mods[1], x)
        assert torch.allclose(got, mods[1](x), atol=1e-6)
        key = (24, 16, torch.float32, 8)  # 5 rows: the bucket of 5-8 rows
        assert dense.DenseForms.chosen == {key: "transposed"}
        # every form once untimed, then ROUNDS passes over the three weights of that shape, then the call itself
        assert calls == {"linear": 1 + 3 * dense.ROUNDS, "transposed": 1 + 3 * dense.ROUNDS + 1}
        runner.linear(mods[0], torch.randn(8, 16))  # same bucket: no new measurement
        assert calls["linear"] == 1 + 3 * dense.ROUNDS
        runner.linear(mods[0], torch.randn(9, 16))  # the next bucket is measured anew
        assert set(dense.DenseForms.chosen) == {key, (24, 16, torch.float32, 16)}
        assert dense.DenseForms.summary() == "24x16 <= 8 rows: transposed; 24x16 <= 16 rows: transposed"
        monkeypatch.setenv(dense.PIN, "fastest")
        with pytest.raises(EngineError, match="L3_DENSE_FORM='fastest': expected one of linear, transposed"):
            runner.linear(mods[0], x)


def test_the_pim_backend_matches_on_a_short_run(tiny_models):
    model = tiny_models["llama"]
    prompts = prompts_for(300)[:4]
    engine = Engine(model, backend="pim", kv_tokens=4096)
    assert engine.generate(prompts, 12) == reference(model, prompts, 12)
    assert engine.pim_simulated_s > 0


def test_a_preempted_request_resumes_and_still_matches(tiny_models):
    model = tiny_models["llama"]
    prompts = prompts_for(300, seed=1)
    engine = Engine(model, backend="cpu", kv_tokens=320, block_size=8)  # room for about two requests' KV
    got = engine.generate(prompts, 64)
    assert int(engine.table.preemptions.sum()) > 0
    assert got == reference(model, prompts, 64)
    assert not engine.blocks.tables and engine.scheduler.kv.used_blocks == 0


def test_stop_tokens_end_a_request_with_the_stop_token_last(tiny_models):
    model = tiny_models["qwen2"]
    p = prompts_for(300)[2]
    full = reference(model, [p], 30)[0]
    stop = full[10]
    got = Engine(model, backend="gpu").generate([p], 30, stop_ids=[stop])[0]
    assert got == full[: full.index(stop) + 1]


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_an_aborted_request_frees_its_kv_and_the_others_still_match(tiny_models, backend):
    model = tiny_models["llama"]
    prompts = prompts_for(300, seed=2)
    engine = Engine(model, backend=backend, kv_tokens=4096)
    rids = [engine.add_request(p, 24) for p in prompts]
    for _ in range(6):
        engine.step()
    victim, waiting = rids[1], engine.add_request(prompts[0], 24)  # one mid-generation, one never admitted
    assert engine.table.kv_blocks[victim] > 0
    assert engine.abort(victim) and engine.abort(waiting) and not engine.abort(victim)
    assert victim not in engine.blocks.tables and engine.outputs[victim].finish_reason == "abort"
    for _ in engine.stream():
        pass
    keep = [i for i in range(len(prompts)) if i != 1]
    assert [engine.outputs[rids[i]].tokens for i in keep] == reference(model, [prompts[i] for i in keep], 24)
    assert engine.scheduler.kv.used_blocks == 0 and not engine.blocks.tables
    assert engine.forget(rids[0]).finish_reason == "length" and rids[0] not in engine.outputs


def test_a_seeded_sampled_request_gets_the_same_tokens_in_any_batch(tiny_models):
    model = tiny_models["qwen2"]
    prompts = prompts_for(300, seed=3)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    alone = Engine(model, backend="cpu")
    alone.add_request(prompts[0], 20, sampling=params)
    crowd = Engine(model, backend="cpu")
    for p in prompts[1:4]:
        crowd.add_request(p, 20, sampling=SamplingParams(temperature=1.0))
    rid = crowd.add_request(prompts[0], 20, sampling=params)
    for e in (alone, crowd):
        for _ in e.stream():
            pass
    sampled = alone.outputs[0].tokens
    assert crowd.outputs[rid].tokens == sampled
    assert sampled != reference(model, [prompts[0]], 20)[0]  # it did sample (greedy differs at 0.8)
    with pytest.raises(EngineError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "float32"])
def test_cpu_attention_pieces_merge_to_the_float64_reference(rng, kv_dtype):
    gen, _ = rng
    n, h, kvh, e = 3, 8, 2, 16
    m = int(gen.integers(PIECE_TOKENS // 4, 3 * PIECE_TOKENS))
    dt = getattr(torch, kv_dtype)
    q = torch.from_numpy(gen.standard_normal((n, h, e)))
    k = torch.from_numpy(gen.standard_normal((m, kvh, e))).to(dt)
    v = torch.from_numpy(gen.standard_normal((m, kvh, e))).to(dt)
    q_pos = torch.arange(m - n, m)
    cuts = np.sort(gen.choice(np.arange(1, m), size=3, replace=False))  # ragged pieces
    parts = []
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, m], strict=True):
        ok = torch.arange(a, b)[None, :] <= q_pos[:, None]
        parts.append(partial_attention(q.float(), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), ok, e**-0.5))
    got = merge(parts).double()
    kd, vd = k.double().repeat_interleave(h // kvh, dim=1), v.double().repeat_interleave(h // kvh, dim=1)
    s = torch.einsum("nhe,mhe->nhm", q, kd) * e**-0.5
    s = s.masked_fill(~(torch.arange(m)[None, :] <= q_pos[:, None])[:, None, :], float("-inf"))
    want = torch.einsum("nhm,mhe->nhe", torch.softmax(s, dim=-1), vd)
    assert float((got - want).abs().max()) < 1e-5  # fp32 accumulation over the stored values


def test_bad_input_is_one_clear_error(tmp_path, tiny_models):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(EngineError, match="architecture 'gpt2' is not supported"):
        load_model(str(bad))
    bare = tmp_path / "bare"
    bare.mkdir()
    transformers.LlamaConfig(**TINY, intermediate_size=128).save_pretrained(bare)
    with pytest.raises(EngineError, match="cannot load its weights"):
        load_model(str(bare))
    (bare / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(EngineError, match="cannot load its weights"):
        load_model(str(bare))
    with pytest.raises(EngineError, match="not found"):
        load_model(str(tmp_path / "nowhere"))
    model = tiny_models["llama"]
    with pytest.raises(EngineError, match="--backend 'tpu'"):
        Engine(model, backend="tpu")
    with pytest.raises(EngineError, match="kv_exceeds_capacity"):
        Engine(model, backend="cpu", kv_tokens=256).add_request(list(range(3, 300)), 10)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_on_cpu_and_gpu_backends():
    pytest.importorskip("gguf")
    model = load_model("smollm2")
    tok = model.tokenizer
    texts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,",
             "Explain why the sky is blue in one paragraph, for a child of eight who keeps asking why.",
             "def fibonacci(n):", "Hello", "Translate to French: good morning, how are you today?",
             "List three prime numbers:"]  # fmt: skip
    prompts = [tok(t)["input_ids"] for t in texts]
    want = reference(model, prompts, 64)
    for backend in ("cpu", "gpu"):
        assert Engine(model, backend=backend, kv_tokens=4096).generate(prompts, 64) == want, backend
    # every projection also comes in the GGUF file's blocks, checked bit for bit against its fp32 weight
    linears = [n for n, m in model.hf.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(model.packed) == sorted(linears) and {w.kind for w in model.packed.values()} == {"Q4_1", "Q8_0"}
    if host_kernel.packed_available():  # the packed kernel on every projection of every decode step
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(dense.PIN, dense.PACKED)
            assert Engine(model, backend="cpu", kv_tokens=4096).generate(prompts, 64) == want


def test_the_simulator_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, l3.cli, l3.run, l3.sim.simulator, l3.report.study, l3.sched; "
            "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_generate_cli_errors_are_one_line():
    from test_cli import l3

    proc = l3("generate", "--backend", "tpu", "hello", check=False)  # the loader's errors: test_bad_input_...
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--backend 'tpu': expected one of" in proc.stderr


@pytest.mark.slow
def test_generate_cli_streams_smollm2_tokens():
    from test_cli import l3

    proc = l3("generate", "--model", "smollm2", "--backend", "cpu", "--max-tokens", "8", "--raw",
              "The capital of France is")  # fmt: skip
    import re

    n = int(re.search(r"(\d+) tokens, \d+ iterations", proc.stderr).group(1))
    assert 1 <= n <= 8 and proc.stdout.strip()  # streamed text, at most the asked-for tokens


@pytest.mark.parametrize("shape", [(3, 5), (4, 1 << 19)])  # below one huge page, and 4 MiB of fp16
def test_host_kv_memory_is_zeroed_whatever_its_pages(shape):
    from l3.engine import host_memory

    t = host_memory.zeros(shape, torch.float16)
    assert t.shape == shape and t.dtype == torch.float16 and t.is_contiguous()
    assert not t.any()
    t[-1, -1] = 1.0  # writable to its last element
    assert float(t.sum()) == 1.0


@given(address=st.integers(0, 2**40), nbytes=st.integers(0, 2**26))
def test_huge_page_advice_covers_exactly_the_whole_huge_pages_inside(address, nbytes):
    from l3.engine.host_memory import HUGE_PAGE, huge_span

    start, length = huge_span(address, nbytes)
    assert start % HUGE_PAGE == 0 and length % HUGE_PAGE == 0 and length >= 0
    if length:  # inside the tensor, and no whole huge page of it left out at either end
        assert address <= start and start + length <= address + nbytes
        assert start - address < HUGE_PAGE and address + nbytes - (start + length) < HUGE_PAGE
    else:  # no aligned page fits
        assert address + nbytes < -(-address // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE


# KV heads that divide the 2 threads split by heads; 3 (and 1) split each run's keys between the threads
@pytest.mark.parametrize("group, head_dim, kvh", [(1, 64, 2), (3, 40, 3), (4, 128, 2), (7, 24, 1), (8, 16, 3)])
def test_the_fused_host_kernel_matches_float64(rng, group, head_dim, kvh):
    from l3.engine import host_kernel

    if not host_kernel.available():
        pytest.skip("no C compiler or no AVX2/FMA/F16C here: the cpu backend uses its PyTorch path")
    gen, _ = rng
    slots = int(gen.integers(1, 3000))
    k = torch.from_numpy(gen.standard_normal((kvh, slots + 7, head_dim))).half()
    v = torch.from_numpy(gen.standard_normal((kvh, slots + 7, head_dim))).half()
    q = torch.from_numpy(gen.standard_normal((1, kvh * group, head_dim))).float()
    a = int(gen.integers(0, 7))  # a run that starts inside the storage, of ragged length
    kernel = host_kernel.HostAttention(threads=2)
    cut = a + slots // 2
    scale = head_dim**-0.5
    got = merge([*kernel.partials(q, k[:, a:cut], v[:, a:cut], scale),
                 *kernel.partials(q, k[:, cut : a + slots], v[:, cut : a + slots], scale)]).double()  # fmt: skip
    kd = k[:, a : a + slots].double().repeat_interleave(group, dim=0)
    vd = v[:, a : a + slots].double().repeat_interleave(group, dim=0)
    p = torch.softmax(torch.einsum("he,hme->hm", q[0].double(), kd) * head_dim**-0.5, dim=-1)
    want = torch.einsum("hm,hme->he", p, vd)[None]
    assert float((got - want).abs().max()) < 1e-5


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
@pytest.mark.parametrize("group, head_dim, kvh", [(1, 64, 2), (3, 64, 3), (4, 128, 2), (7, 24, 1), (8, 16, 3)])
def test_the_batched_host_decode_matches_float64(rng, kv_dtype, group, head_dim, kvh):
    """Requests of ragged lengths whose keys lie in scattered runs of slots (paged blocks), on 1 and 2 threads."""
    from l3.engine import host_kernel

    if not host_kernel.available():
        pytest.skip("no C compiler or no AVX2/FMA/F16C here: the backends use their PyTorch paths")
    gen, _ = rng
    dt, slots_total = getattr(torch, kv_dtype), 4096
    k = torch.from_numpy(gen.standard_normal((kvh, slots_total, head_dim))).to(dt)
    v = torch.from_numpy(gen.standard_normal((kvh, slots_total, head_dim))).to(dt)
    batch = int(gen.integers(1, 7))
    slots = [np.sort(gen.choice(slots_total, int(gen.integers(1, 700)), replace=False)) for _ in range(batch)]
    q = torch.from_numpy(gen.standard_normal((batch, kvh * group, head_dim))).float()
    scale = head_dim**-0.5
    for threads in (1, 2):
        got = host_kernel.HostAttention(threads).decode(q, k, v, host_kernel.DecodeRuns.of(slots, kvh, threads),
                                                        scale).double()  # fmt: skip
        for b, sl in enumerate(slots):
            idx = torch.from_numpy(sl)
            kd = k[:, idx].double().repeat_interleave(group, dim=0)
            vd = v[:, idx].double().repeat_interleave(group, dim=0)
            p = torch.softmax(torch.einsum("he,hme->hm", q[b].double(), kd) * scale, dim=-1)
            want = torch.einsum("hm,hme->he", p, vd)
            assert float((got[b] - want).abs().max()) < 1e-5


@given(lengths=st.lists(st.integers(1, 2000), min_size=0, max_size=40), kvh=st.integers(1, 8),
       threads=st.integers(1, 4))  # fmt: skip
def test_decode_runs_give_every_request_head_to_one_thread_and_keep_every_slot(lengths, kvh, threads):
    from l3.engine.host_kernel import DecodeRuns

    gen = np.random.default_rng(sum(lengths) + kvh)
    slots = [np.sort(gen.choice(4 * n, n, replace=False)) for n in lengths]
    where = DecodeRuns.of(slots, kvh, threads)
    if len(lengths) >= threads:  # whole requests per thread: one share each
        assert len(where.spans) <= threads
    owners = np.zeros((len(lengths), kvh), int)
    for b0, b1, h0, h1 in where.spans:
        owners[b0:b1, h0:h1] += 1
    assert (owners == 1).all()
    for b, sl in enumerate(slots):  # the runs of request b are its slots, in order
        runs = where.runs[where.run_lo[b] : where.run_lo[b + 1]]
        assert np.array_equal(np.concatenate([np.arange(a, a + n) for a, n in runs]), sl)
        assert (runs[:, 1] >= 1).all()


@given(n=st.integers(1, 300), k=st.integers(1, 200), threads=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_the_host_gemv_matches_float64(n, k, threads, seed):
    from l3.engine import host_kernel

    if not host_kernel.available():
        pytest.skip("no C compiler or no AVX2/FMA/F16C here: projections use PyTorch")
    gen = np.random.default_rng(seed)
    w, x = torch.from_numpy(gen.standard_normal((n, k))), torch.from_numpy(gen.standard_normal(k))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = host_kernel.gemv(w.float(), x.float())
    finally:
        torch.set_num_threads(before)
    want = w.float().double() @ x.float().double()
    assert got.shape == (n,) and float((got.double() - want).abs().max()) <= 1e-5 * max(1.0, k**0.5)
    assert host_kernel.gemv(w, x) is None  # float64: not the kernel's


def _random_blocks(gen: np.random.Generator, kind: str, n: int, blocks: int) -> np.ndarray:
    """n rows of `blocks` random GGUF blocks: fp16 scale (and minimum for Q4_1), random codes."""
    scales = gen.normal(0.0, 0.05, (n, blocks, 2 if kind == "Q4_1" else 1)).astype(np.float16).view(np.uint8)
    codes = gen.integers(0, 256, (n, blocks, 16 if kind == "Q4_1" else 32), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([scales, codes], axis=2).reshape(n, -1))


@settings(deadline=None)  # the first call may build the host kernels
@given(kind=st.sampled_from(["Q4_1", "Q8_0"]), n=st.integers(1, 70), blocks=st.integers(1, 6),
       rows=st.integers(1, host_kernel.PACKED_MAX_ROWS), split=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_the_packed_kernel_matches_float64(kind, n, blocks, rows, split, seed):
    """x W^T from GGUF blocks against float64 over the weights gguf-py dequantizes; each row of a several-row
    call is the one-row call's result bit for bit (the same sums in the same order), split over threads or not."""
    from l3.engine.packed import PackedWeight, dequantize

    if not host_kernel.packed_available():
        pytest.skip("no C compiler or no AVX-512F here: packed weights are not used")
    gen = np.random.default_rng(seed)
    raw = _random_blocks(gen, kind, n, blocks)
    w = PackedWeight.from_blocks(kind, raw, 32 * blocks)
    assert np.array_equal(w.blocks, raw)  # the kernel's layout gives the file's blocks back
    x = torch.from_numpy(gen.standard_normal((rows, w.k))).float()
    with pytest.MonkeyPatch.context() as mp:  # every call split over the threads, or none
        mp.setattr(host_kernel, "PACKED_MIN_BYTES_PER_THREAD", 1 if split else 1 << 40)
        got = host_kernel.gemv_packed(w, x)
    want = x.double().numpy() @ dequantize(w).astype(np.float64).T
    scale = np.abs(x.double().numpy()) @ np.abs(dequantize(w).astype(np.float64)).T
    assert got.shape == (rows, n) and (np.abs(got.double().numpy() - want) <= 1e-6 * w.k**0.5 * scale + 1e-30).all()
    for r in range(rows):
        assert torch.equal(host_kernel.gemv_packed(w, x[r : r + 1])[0], got[r])
    assert host_kernel.gemv_packed(w, x.double()) is None  # float64: not the kernel's


def test_packed_rows_undo_the_gguf_llama_permutation_as_transformers_does():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from l3.engine.packed import _llama_rows

    for n, heads in ((576, 9), (192, 3), (64, 4)):
        rows = np.arange(n)[:, None]
        want = LlamaTensorProcessor()._reverse_permute_weights(rows, heads, heads)[:, 0]
        assert np.array_equal(_llama_rows(n, heads), want)


def test_fp16_kv_on_the_cpu_backend_agrees_with_the_gpu_backend(tiny_models, monkeypatch):
    import l3.engine.attention as attention

    monkeypatch.setattr(attention, "PIECE_TOKENS", 64)  # so that decodes past 64 tokens take the long path
    model = tiny_models["llama"]
    prompts = [np.random.default_rng(3).integers(3, 300, 200).tolist(), [5, 6, 7]]
    runs = []
    for backend in ("gpu", "cpu"):
        engine = Engine(model, backend=backend, kv_tokens=4096, kv_dtype="float16")
        if backend == "cpu":  # fp16 decodes go to the fused kernel where it builds
            from l3.engine import host_kernel

            assert (engine.attention.kernel is not None) == host_kernel.available()
        engine.logits = {}
        runs.append((engine.generate(prompts, 12), engine.logits))
    (a, la), (b, lb) = runs
    assert a == b
    assert max(float(np.abs(x - y).max()) for r in la for x, y in zip(la[r], lb[r], strict=True)) < 1e-4


def test_a_long_running_engine_keeps_a_bounded_record_of_predictor_errors(tiny_models):
    engine = Engine(tiny_models["llama"], backend="cpu")
    engine.scheduler.keep_recent(5)
    engine.generate(prompts_for(300)[:4], 40)
    errors = engine.scheduler.pim_err.errors, engine.scheduler.gpu_err.errors
    assert all(len(e) == 5 for e in errors)  # 40 iterations measured, the last 5 kept
    assert engine.scheduler.report()["gpu_predictor_error"]["n"] == 5


@given(t=st.integers(1, 40), heads=st.integers(1, 9), half=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_the_engines_rotary_embedding_is_transformers_bit_for_bit(t, heads, half, seed):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from l3.engine.model import rotary

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, heads, 2 * half, generator=gen) * 10
    angle = torch.randn(t, 2 * half, generator=gen) * 100
    cos, sin = angle.cos()[None], angle.sin()[None]  # (1, T, E), as the model's rotary module gives them
    want, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin)
    signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
    assert torch.equal(rotary(q, cos[0, :, None], signed[:, None]), want[0].transpose(0, 1))
