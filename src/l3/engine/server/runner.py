"""The engine on a thread of its own, fed by many clients: requests join its continuous batch through the
scheduler's `add()` between iterations, and their tokens go back to each client's queue as they are produced.

Everything that touches the engine (adding, aborting, reading its state for metrics) runs on the engine thread,
between iterations, as a command; nothing else needs a lock. Events sent to a request's sink:
("token", id), then ("end", "length" | "stop"), or ("error", message) if the engine failed."""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from l3.engine.engine import Engine
from l3.engine.sampling import SamplingParams
from l3.engine.server.metrics import ServerMetrics
from l3.errors import EngineError

log = logging.getLogger("l3.serve")

Sink = Callable[[tuple[str, Any]], None]


class Overloaded(EngineError):
    """More requests wait for admission than the server's bound."""


class EngineThread:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_waiting: int):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._sinks: dict[int, Sink] = {}
        self._arrived: dict[int, float] = {}  # request -> when it was added (s, perf_counter)
        self._last: dict[int, float] = {}  # request -> when its last token was sent
        self._thread = threading.Thread(target=self._loop, name="l3-engine", daemon=True)
        self._running = True
        self._thread.start()

    # --- called from other threads -----------------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between iterations; its result (or exception) comes in the future."""
        fut: Future = Future()

        def command() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the caller gave up before it ran
            try:
                fut.set_result(fn())
            except Exception as exc:  # handed to the caller
                fut.set_exception(exc)

        self._commands.put(command)
        return fut

    def submit(self, prompt: Sequence[int], max_tokens: int, stop_ids: Sequence[int], sampling: SamplingParams,
               sink: Sink) -> Future:  # fmt: skip
        """Add a request; the future gives its id, or raises Overloaded or EngineError (it cannot be served)."""

        def add() -> int:
            if len(self.engine.queue) >= self.max_waiting:
                raise Overloaded(f"{len(self.engine.queue)} requests already wait for admission (the bound is "
                                 f"{self.max_waiting}); retry later")  # fmt: skip
            rid = self.engine.add_request(prompt, max_tokens, stop_ids, sampling)
            self._sinks[rid] = sink
            self._arrived[rid] = time.perf_counter()
            self.metrics.prompt_tokens.inc(len(prompt))
            return rid

        return self.call(add)

    def abort(self, rid: int) -> None:
        """Withdraw a request (its client went away); its KV is freed before the next iteration."""

        def drop() -> None:
            if rid in self._sinks and self.engine.abort(rid):
                self._end(rid, "abort")

        self._commands.put(drop)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._running = False
        self._commands.put(None)
        self._thread.join(timeout=30)

    # --- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._running:
            self._run_commands(block=not self.engine.busy)
            if not self._running or not self.engine.busy:
                continue
            try:
                produced = self.engine.step()
            except Exception:  # fail the requests in flight, keep serving the next ones
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._fail_all("the engine failed on this request's batch; see the server log")
                continue
            self._deliver(produced)

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
            while True:
                if command is None:
                    return
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _deliver(self, produced: list[tuple[int, int]]) -> None:
        now = time.perf_counter()
        m = self.metrics
        for rid, token in produced:
            last = self._last.get(rid)
            if last is None:
                m.ttft.observe(now - self._arrived[rid])
            else:
                m.tbt.observe(now - last)
            self._last[rid] = now
            self._sinks[rid](("token", token))
        m.generated_tokens.inc(len(produced))
        for rid in {rid for rid, _ in produced}:
            out = self.engine.outputs[rid]
            if out.finished:
                self._end(rid, out.finish_reason)

    def _end(self, rid: int, reason: str, event: str = "end") -> None:
        """Tell the request's client it ended and forget it."""
        self._sinks.pop(rid)((event, reason))
        self._arrived.pop(rid)
        self._last.pop(rid, None)
        self.engine.forget(rid)
        self.metrics.finished.labels(reason="error" if event == "error" else reason).inc()

    def _fail_all(self, message: str) -> None:
        for rid in list(self._sinks):
            if not self.engine.outputs[rid].finished:
                self.engine.abort(rid)
            self._end(rid, message, event="error")
