"""An OpenAI-compatible HTTP server on the engine (FastAPI): /v1/completions and /v1/chat/completions (plain or
streamed as server-sent events), /v1/models, /health and /metrics (Prometheus text).

Every request joins the one continuous batch of the engine thread (`runner.EngineThread`); a client that goes
away has its request aborted and its KV freed before the next iteration. Bad requests get OpenAI's error body
with a 4xx status; more waiting requests than `max_waiting` get 429."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from l3.engine.engine import Engine
from l3.engine.sampling import SamplingParams
from l3.engine.server.metrics import ServerMetrics
from l3.engine.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, Sampling
from l3.engine.server.runner import EngineThread, Overloaded
from l3.engine.text import TextStream
from l3.errors import EngineError

DEFAULT_MAX_WAITING = 256  # requests waiting for admission before new ones get 429
DISCONNECT_CHECK_S = 0.5  # a non-streamed request checks this often whether its client is still there


class Generation:
    """One request in flight: its tokens from the engine thread, as text pieces for the client."""

    def __init__(self, runner: EngineThread, text: TextStream):
        self.runner, self.text = runner, text
        self.events: asyncio.Queue = asyncio.Queue()
        self.rid: int | None = None
        self.tokens = 0
        self.finish_reason: str | None = None

    async def start(self, prompt: list[int], max_tokens: int, stop_ids: list[int], sampling: SamplingParams) -> None:
        loop = asyncio.get_running_loop()

        def sink(event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        added = self.runner.submit(prompt, max_tokens, stop_ids, sampling, sink)
        try:
            self.rid = await asyncio.wrap_future(added)
        except asyncio.CancelledError:  # the client went away before the request was added: withdraw it once it is
            added.add_done_callback(lambda f: not f.cancelled() and f.exception() is None
                                    and self.runner.abort(f.result()))  # fmt: skip
            raise
        except Overloaded as exc:
            raise APIError(429, str(exc), code="overloaded") from None
        except EngineError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from None

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, finish reason or None) for each token; the last piece has the reason. A consumer that stops
        early (its client went away) aborts the request."""
        try:
            while self.finish_reason is None:
                kind, value = await self.events.get()
                if kind == "error":
                    raise APIError(500, value, code="engine_error")
                if kind == "end":
                    self.finish_reason = value
                    yield self.text.flush(), value
                    return
                self.tokens += 1
                piece = self.text.push(value)
                if self.text.stopped:  # a stop string: the request ends here
                    self.finish_reason = "stop"
                    self.runner.abort(self.rid)
                yield piece, self.finish_reason
        finally:
            if self.finish_reason is None:
                self.runner.abort(self.rid)


def create_app(engine: Engine, model_name: str, max_waiting: int = DEFAULT_MAX_WAITING) -> FastAPI:
    """The server for `engine` (not started); `model_name` is the id clients ask for."""
    tokenizer = engine.model.tokenizer
    if tokenizer is None:
        raise EngineError(f"model {engine.model.source}: no tokenizer in its folder; the server needs one")
    metrics = ServerMetrics()
    state: dict[str, EngineThread] = {}
    context = engine.max_request_tokens
    vocab = int(engine.model.hf.config.vocab_size)
    eos = [t for t in (tokenizer.eos_token_id,) if t is not None]
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["runner"] = EngineThread(engine, metrics, max_waiting)
        yield
        state["runner"].close()

    app = FastAPI(title="L3 engine", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return await api_error(request, APIError(400, f"malformed JSON body: {err.get('msg')}"))
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if not where:
            return await api_error(request, APIError(400, f"the body must be a JSON object ({err.get('msg')})"))
        return await api_error(request, APIError(400, f"{where}: {err.get('msg')}", param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, str(exc.detail)))

    def check(body: Sampling, prompt: list[int], max_tokens: int | None) -> int:
        """The request's max_tokens (default: the rest of the context), after every check the engine needs."""
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`",
                           "model", "model_not_found")  # fmt: skip
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", "prompt")
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(400, f"max_tokens {max_tokens}: expected at least 1", "max_tokens")
        room = context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server holds at most {context} per "
                           "request (model context and KV capacity), prompt and output together", "prompt",
                           "context_length_exceeded")  # fmt: skip
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens}: the prompt's {len(prompt)} tokens leave room for at most "
                           f"{room} of this server's {context}-token context", "max_tokens",
                           "context_length_exceeded")  # fmt: skip
        return room if max_tokens is None else max_tokens

    async def run(body: Sampling, prompt: list[int], max_tokens: int | None, request: Request,
                  chunk, final) -> Response:  # fmt: skip
        """Start the generation; stream `chunk(text, reason)` events, or answer `final(text, reason, usage)`."""
        max_tokens = check(body, prompt, max_tokens)
        runner = state["runner"]
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        gen = Generation(runner, TextStream(tokenizer, body.stops()))
        await gen.start(prompt, max_tokens, [] if body.ignore_eos else eos, sampling)

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": gen.tokens,
                    "total_tokens": len(prompt) + gen.tokens}  # fmt: skip

        if body.stream:

            async def events() -> AsyncIterator[str]:
                try:
                    async for piece, reason in gen.pieces():
                        yield f"data: {json.dumps(chunk(piece, reason))}\n\n"
                except APIError as exc:  # the status was sent already: the error is the stream's last event
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
                if body.stream_options and body.stream_options.include_usage:
                    yield f"data: {json.dumps(chunk(None, None) | {'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        parts: list[str] = []
        pieces = gen.pieces()
        waiting = asyncio.ensure_future(anext(pieces))
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_CHECK_S)
            if not done:
                if await request.is_disconnected():
                    waiting.cancel()  # the generator's cleanup aborts the request
                    await asyncio.gather(waiting, return_exceptions=True)
                    return Response(status_code=499)
                continue
            piece, reason = waiting.result()
            parts.append(piece)
            if reason is not None:
                await pieces.aclose()
                return JSONResponse(final("".join(parts), reason, usage()))
            waiting = asyncio.ensure_future(anext(pieces))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: {len(prompt)} prompts given; this server takes one per request",
                               "prompt")  # fmt: skip
            prompt = prompt[0]
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, reason):
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}  # fmt: skip

        def final(text, reason, usage):
            return chunk(text, reason) | {"usage": usage}

        return await run(body, ids, body.max_tokens, request, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"model {model_name} has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.content or ""} for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]  # fmt: skip
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]

        def chunk(text, reason):
            delta = {} if text is None else {"content": text}
            if first[0]:
                delta, first[0] = {"role": "assistant"} | delta, False
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}  # fmt: skip

        def final(text, reason, usage):
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                 "finish_reason": reason}], "usage": usage}  # fmt: skip

        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await run(body, ids, max_tokens, request, chunk, final)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "l3", "max_model_len": context,
                                            "vocab_size": vocab}]}  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = "runner" in state and state["runner"].alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        await asyncio.wrap_future(state["runner"].call(lambda: metrics.refresh(engine)))
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn on a background thread (port 0: a free one); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="l3-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise EngineError(f"the server could not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
