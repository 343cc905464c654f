"""`l3 serve` through the official `openai` client and raw HTTP, on a tiny random-weight Llama with a tokenizer
learnt here (SmolLM2-135M in one slow test): completions and chat (plain and streamed) equal the engine's own
greedy output; 16 concurrent clients; a disconnect frees the request's KV (seen in /metrics);
every bad request gets its status and OpenAI error body and the server keeps serving; overload gets 429; the
load test replays a workload. Plus the pieces: stop strings in the text stream, the sampler."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

torch.set_num_threads(1)  # one xdist worker per core

from l3.engine.engine import Engine  # noqa: E402
from l3.engine.loader import load_model  # noqa: E402
from l3.engine.sampling import Sampler, SamplingParams  # noqa: E402
from l3.engine.server.app import create_app, serving  # noqa: E402
from l3.engine.server.loadtest import check_url, run_loadtest  # noqa: E402
from l3.engine.text import TextStream  # noqa: E402
from l3.errors import EngineError  # noqa: E402

NAME = "tiny"
KV_TOKENS = 2048
NEW = 12  # new tokens per request
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
CORPUS = [  # what the tiny tokenizer's merges are learnt from
    "The quick brown fox jumps over the lazy dog.", "Once upon a time there was a small model.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "The capital of France is Paris, and the capital of Italy is Rome.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Memory bandwidth bounds decode attention; compute bounds prefill.", "Name a colour: red, green or blue.",
]  # fmt: skip
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def tiny_chat_model(folder):
    """A random-weight Llama with a byte-level BPE tokenizer (learnt here) and a chat template, saved as a user's
    model folder and loaded as one: the server's tests need a tokenizer, not a trained model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE)  # fmt: skip
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def server(model):
    """(base URL, engine) of a server on a free localhost port."""
    engine = Engine(model, backend="cpu", kv_tokens=KV_TOKENS)
    with serving(create_app(engine, NAME)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def greedy_text(model, ids_list, max_tokens):
    """The engine's own greedy continuations (stopping at end-of-text), decoded as the server decodes them."""
    tok = model.tokenizer
    engine = Engine(model, backend="cpu", kv_tokens=KV_TOKENS)
    outs = engine.generate(ids_list, max_tokens, stop_ids=[tok.eos_token_id])
    return [tok.decode(o, skip_special_tokens=True) for o in outs], [len(o) for o in outs]


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_completions_and_chat_equal_the_engine_greedy_output_plain_and_streamed(model, server, client):
    tok = model.tokenizer
    prompt = PROMPTS[0]
    (want,), (n,) = greedy_text(model, [tok(prompt)["input_ids"]], NEW)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert r.choices[0].finish_reason == ("length" if n == NEW else "stop")
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

    messages = [{"role": "user", "content": "Name a colour."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    (want_chat,), _ = greedy_text(model, [ids], NEW)
    c = client.chat.completions.create(model=NAME, messages=messages, max_tokens=NEW, temperature=0)
    assert c.choices[0].message.content == want_chat and c.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    parts = list(stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want_chat
    assert parts[-1].usage.completion_tokens == c.usage.completion_tokens

    # A stop string cuts the text before it, plain and streamed alike.
    at = next(i for i in range(len(want) // 2, len(want) - 1) if want[i : i + 2].isalnum())
    stop = want[at : at + 2]
    cut = want[: want.index(stop)]
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    s = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in s) == cut

    # Sampling: a seed fixes the text; top_p this small leaves only the most likely token (greedy).
    a, b = (client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=1.0, seed=7)
            for _ in range(2))  # fmt: skip
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=1.0, top_p=1e-6, seed=3)
    assert r.choices[0].text == want


@pytest.mark.slow
def test_smollm2_served_equals_the_engine_greedy_output():
    lm = load_model("smollm2")
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]  # fmt: skip
    plain = lm.tokenizer(PROMPTS[0])["input_ids"]
    (want, want_chat), _ = greedy_text(lm, [plain, ids], NEW)
    with serving(create_app(Engine(lm, backend="cpu", kv_tokens=KV_TOKENS), "smollm2")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
        assert r.choices[0].text == want
        stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=NEW, temperature=0,
                                                stream=True)  # fmt: skip
        assert "".join(p.choices[0].delta.content or "" for p in stream) == want_chat


def test_sixteen_concurrent_clients_all_get_their_own_greedy_output(model, server, client):
    tok = model.tokenizer
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    want, _ = greedy_text(model, [tok(p)["input_ids"] for p in prompts], 8)
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        got[i] = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [got.get(i) for i in range(16)] == want


def test_a_client_that_disconnects_mid_stream_has_its_kv_freed(server):
    url, _ = server
    aborted = metric(url, "l3_requests_finished_total", '{reason="abort"}')
    tokens = metric(url, "l3_generation_tokens_total")
    body = {"model": NAME, "prompt": "Count to a thousand:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(12), lines, strict=False) if line.startswith("data: ")) >= 3
        assert metric(url, "l3_kv_blocks_used", '{tier="0"}') > 0  # it holds KV while it streams
    deadline = time.time() + 30
    while time.time() < deadline and metric(url, "l3_kv_blocks_used", '{tier="0"}') > 0:
        time.sleep(0.1)
    assert metric(url, "l3_kv_blocks_used", '{tier="0"}') == 0
    assert metric(url, "l3_requests_running") == 0
    assert metric(url, "l3_requests_finished_total", '{reason="abort"}') == aborted + 1
    assert metric(url, "l3_generation_tokens_total") - tokens < 1500  # it did not run to the end


@pytest.mark.parametrize(("body", "status", "says"), [
    (b"{not json", 400, "malformed JSON"),
    ({"model": "gpt-9", "prompt": "hi", "max_tokens": 4}, 404, "does not exist"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens 0"),
    ({"model": NAME, "prompt": "hi", "max_tokens": KV_TOKENS * 4}, 400, "max_tokens"),
    ({"model": NAME, "prompt": [5] * (KV_TOKENS + 10), "max_tokens": 4}, 400, "prompt has"),
    ({"model": NAME, "prompt": "hi", "max_tokens": "four"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": 42}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": [10**9]}, 400, "token ids"),
    ({"model": NAME, "prompt": ["a", "b"]}, 400, "one per request"),
    ({"prompt": "hi"}, 400, "model"),
])  # fmt: skip
def test_bad_requests_get_their_status_and_an_openai_error_body(server, body, status, says):
    url, _ = server
    raw = {"content": body, "headers": {"content-type": "application/json"}}
    kw = raw if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert says in err["message"] and err["type"]
    ok = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1  # still serving


def test_the_openai_client_sees_the_errors_as_its_own_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=KV_TOKENS * 2)  # fmt: skip


def test_models_health_and_metrics(server):
    url, engine = server
    models = httpx.get(url + "/v1/models").json()["data"]
    assert models[0]["id"] == NAME and models[0]["max_model_len"] == engine.max_request_tokens
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for name in ("l3_requests_running", "l3_requests_waiting", "l3_kv_blocks_used", "l3_kv_blocks_total",
                 "l3_time_to_first_token_seconds_bucket", "l3_time_between_tokens_seconds_bucket",
                 "l3_generation_tokens_total"):  # fmt: skip
        assert name in text
    assert metric(url, "l3_kv_blocks_total", '{tier="0"}') == KV_TOKENS // 16


def test_more_waiting_requests_than_the_bound_get_429(model):
    engine = Engine(model, backend="cpu", kv_tokens=2048)  # room for one of these requests' prompts at a time
    with serving(create_app(engine, NAME, max_waiting=1)) as url:
        body = {"model": NAME, "prompt": [100] * 1500, "max_tokens": 500, "ignore_eos": True}
        codes: list[int] = []

        def send() -> None:
            codes.append(httpx.post(url + "/v1/completions", json=body, timeout=120).status_code)

        def until(name: str, value: float) -> None:
            deadline = time.time() + 60
            while metric(url, name) != value and time.time() < deadline:
                time.sleep(0.01)

        threads = [threading.Thread(target=send) for _ in range(2)]
        threads[0].start()
        until("l3_requests_running", 1)  # the first runs
        threads[1].start()
        until("l3_requests_waiting", 1)  # the second waits for room
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        for t in threads:
            t.join(timeout=120)
        assert codes == [200, 200]
        r = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 2}, timeout=60)
        assert r.status_code == 200  # served again once the queue drained


def test_an_engine_failure_fails_its_requests_and_the_server_keeps_serving(model):
    engine = Engine(model, backend="cpu", kv_tokens=KV_TOKENS)
    real, fail = engine.step, [True]

    def step():
        if fail[0]:
            fail[0] = False
            raise RuntimeError("injected")
        return real()

    engine.step = step
    body = {"model": NAME, "prompt": "hi", "max_tokens": 4}
    with serving(create_app(engine, NAME)) as url:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        fail[0] = True
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and '"engine_error"' in events[-1]  # the stream's last event is the error
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert metric(url, "l3_requests_finished_total", '{reason="error"}') == 2
        assert metric(url, "l3_kv_blocks_used", '{tier="0"}') == 0


def test_the_load_test_replays_a_workload_and_reports_percentiles(server):
    url, _ = server
    res = run_loadtest(url, "fixed:40:8", concurrency=4, n_requests=8, max_seconds=120)
    assert (res["completed"], res["failed"], res["unfinished"]) == (8, 0, 0)
    assert res["output_tokens"] == res["output_tokens_expected"] == 64 and res["prompt_tokens"] == 320
    assert 0 < res["ttft_s"]["p50"] <= res["ttft_s"]["p99"] and 0 < res["tbt_s"]["p50"] <= res["tbt_s"]["p99"]
    assert res["throughput_tok_s"] > 0
    with pytest.raises(EngineError, match="this machine"):
        check_url("http://example.com:8000")


def test_serve_and_loadtest_cli_errors_are_one_line():
    from test_cli import l3

    proc = l3("serve", "--backend", "tpu", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--backend 'tpu'" in proc.stderr
    proc = l3("loadtest", "--url", "http://example.com:8000", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "this machine" in proc.stderr
    with pytest.raises(EngineError, match="no OpenAI-compatible server"):
        run_loadtest("http://127.0.0.1:9", "fixed:4:4", 1, 1)  # nothing listens there


class CharTokenizer:
    """One character per token id (its code point)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_the_text_stream_never_sends_what_a_stop_string_takes_back():
    for text, stops, want in [("hello world, bye", ["world"], "hello "), ("abcabd", ["abd"], "abc"),
                              ("no stop here", ["zzz"], "no stop here"), ("xyyz", ["yz", "xy"], "")]:  # fmt: skip
        s = TextStream(CharTokenizer(), stops)
        sent = ""
        for ch in text:
            sent += s.push(ord(ch))
            assert want.startswith(sent)  # nothing sent is ever beyond the cut
            if s.stopped:
                break
        sent += s.flush()
        assert sent == want and s.stopped == (want != text)


def test_the_sampler_keeps_to_the_nucleus_and_its_seed():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    probs = torch.softmax(logits[0].double(), 0).numpy()
    sampler = Sampler()
    p = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    sampler.add(0, p)
    draws = np.array([sampler(logits, [0])[0] for _ in range(4000)])
    nucleus = 2  # p0 + p1 = 0.83 >= 0.8, reached with the two most likely tokens
    assert set(draws.tolist()) == {0, 1}
    want = probs[:nucleus] / probs[:nucleus].sum()
    assert np.allclose(np.bincount(draws, minlength=nucleus) / len(draws), want, atol=0.03)
    again = Sampler()
    again.add(5, p)
    assert [again(logits, [5])[0] for _ in range(50)] == draws[:50].tolist()  # the seed alone fixes them
    sampler.add(9, SamplingParams())
    assert sampler(logits, [9]) == [0]  # greedy


def test_greedy_picks_the_first_largest_logit_as_torch_argmax_does():
    rng = np.random.default_rng(7)
    for rows, vocab in ((1, 5), (3, 300), (32, 4096)):
        logits = torch.from_numpy(rng.integers(-3, 4, (rows, vocab)).astype(np.float32))  # many ties
        assert Sampler()(logits, list(range(rows))) == logits.argmax(dim=-1).tolist()
