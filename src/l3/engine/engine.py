"""The engine loop: the same scheduler object the simulator drives plans each iteration; the engine runs the
plan's tokens through the model, measures what each sub-batch cost, and reports it back (`observe`).

    plan = scheduler.schedule(now); timing = engine.execute(plan); scheduler.observe(plan, timing);
    scheduler.commit(plan, now + timing.duration)

Token accounting follows `sched.requests`: a decode step of a request with g generated tokens feeds its last
token at position prompt + g - 1 and writes that token's KV; a prefill chunk feeds tokens [prefix, prefix +
chunk) of prompt + generated (a preempted request re-prefills what it had) and, when it completes the target,
produces the next token, chosen by the request's sampling parameters (greedy by default; `sampling`). A request
ends when it has its tokens ("length"), at a stop token ("stop") or when withdrawn (`abort`)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from l3.engine.attention import BACKENDS, Segment
from l3.engine.link import link_for
from l3.engine.loader import LoadedModel
from l3.engine.model import DecoderRunner
from l3.engine.sampling import GREEDY, Sampler, SamplingParams
from l3.errors import EngineError
from l3.sched import Topology, build_scheduler
from l3.sched.kv import BlockTables
from l3.sched.plan import Plan
from l3.sched.requests import RequestTable, Status, WaitingQueue
from l3.sched.timing import IterationTiming
from l3.specs.system import SystemSpec, get_system

DEFAULT_KV_TOKENS = 16_384  # KV capacity when none is given (tokens; SmolLM2 in fp32: 0.75 GB)
RECENT_ITERATIONS = 100_000  # per-iteration records (predictor errors) an engine keeps: a server runs for days
# The most of the wall time the scheduler's learning may take (our assumption: a forest refit costs ~10 ms here,
# and refitting on the count rule alone cost 5% of a batch-1 decode's time)
LEARNING_SHARE = 0.02


@dataclass
class Output:
    """A request's generated tokens so far and whether it has finished."""

    rid: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop" or "abort"

    def ids(self, a: int, b: int) -> list[int]:
        """Tokens a .. b - 1 of prompt + generated (without joining the two)."""
        p = len(self.prompt)
        return self.prompt[a:min(b, p)] + self.tokens[max(a - p, 0) : max(b - p, 0)]


class Engine:
    def __init__(self, model: LoadedModel, backend: str = "cpu", kv_tokens: int = DEFAULT_KV_TOKENS,
                 block_size: int = 16, kv_dtype: str | None = None, system: SystemSpec | None = None,
                 threads: int | None = None, max_batched_tokens: int | None = None,
                 overlap: bool | None = None):  # fmt: skip
        """`backend`: where decode attention runs (attention.BACKENDS); `kv_tokens`: KV capacity; `kv_dtype`:
        storage of the paged KV (default: the model's dtype); `system`: the scheduler and coordination specs
        (default: `l3` for a memory-side backend, `gpu-only` for `gpu`); `threads`: the host threads PyTorch
        uses (default: as set); `max_batched_tokens`: tokens per iteration, decodes + prefill chunks (default:
        the system's; smaller chunks shorten the steps that decoding requests wait on); `overlap`: run a plan's
        two sub-batches interleaved, one's attention on the host while the dense device runs the other's layers
        (`DecoderRunner.forward_pair`; default: where the dense device is a GPU and attention is memory-side; on
        a CPU both sides share the same cores, so each iteration runs as one batch)."""
        if backend not in BACKENDS:
            raise EngineError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.model, self.backend_name = model, backend
        self.runner = DecoderRunner(model.hf, model.family, model.packed)
        memory_side = backend != "gpu"
        if overlap and not memory_side:
            raise EngineError("overlap needs a memory-side attention backend (cpu or pim): gpu attends on the "
                              "dense device")  # fmt: skip
        self.overlap = memory_side and self.runner.device.type == "cuda" if overlap is None else overlap
        self.link = link_for(self.runner.device)
        base = system or get_system("l3" if memory_side else "gpu-only")
        update = {"block_size": block_size} | ({} if max_batched_tokens is None else
                                                {"max_batched_tokens": max_batched_tokens})  # fmt: skip
        scheduler = base.scheduler.model_copy(update=update)
        self.system = base.model_copy(update={"scheduler": scheduler})
        self.table = RequestTable()
        self.queue = WaitingQueue(self.table)
        # Without overlap the engine runs a plan's sub-batches one after the other on its one dense device, so a
        # second sub-batch would only read the weights again: every iteration then runs as one batch.
        topology = Topology(kv_tiers=(kv_tokens,), slots=1 if memory_side else None, overlap=self.overlap)
        self.scheduler = build_scheduler(self.system, model.spec, topology, self.table, self.queue)
        self.scheduler.keep_recent(RECENT_ITERATIONS)
        self.scheduler.cap_learning_time(LEARNING_SHARE)
        self.blocks = BlockTables(self.scheduler.kv)
        r = self.runner
        dtype = getattr(torch, kv_dtype) if kv_dtype else next(model.hf.parameters()).dtype
        if threads is not None:
            torch.set_num_threads(threads)
        extra = {"pim": {"model_spec": model.spec}}.get(backend, {})
        self.attention = BACKENDS[backend](r.n_layers, r.n_kv_heads, r.head_dim, r.n_heads, r.scale, r.window,
                                           self.scheduler.kv.capacity_blocks, block_size, dtype, r.device,
                                           **extra)  # fmt: skip
        self.outputs: dict[int, Output] = {}
        self.stop_ids: dict[int, set[int]] = {}
        self.sampler = Sampler()
        self.t0 = time.perf_counter()
        self.iterations = 0
        self.pim_simulated_s = 0.0  # the pim backend: the device model's decode-attention time, summed over steps
        self.logits: dict[int, list[np.ndarray]] | None = None  # set to {} to keep each produced token's logits

    # --- requests -----------------------------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + new) one request may have: the model's context and the KV capacity."""
        limit = self.scheduler.max_request_tokens()
        window = self.model.spec.max_context
        return limit if window is None else min(limit, window)

    def add_request(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                    sampling: SamplingParams = GREEDY) -> int:  # fmt: skip
        """Queue a request (token ids); returns its id. A prompt the KV can never hold is an EngineError."""
        if not len(prompt) or max_new_tokens < 1:
            raise EngineError("a request needs at least one prompt token and max_new_tokens >= 1")
        window = self.runner.window
        if window is not None and not self.attention.windowed and len(prompt) + max_new_tokens > window:
            raise EngineError(f"request of {len(prompt)} prompt tokens + {max_new_tokens} new: beyond the model's "
                              f"sliding window of {window} tokens, which the {self.backend_name} backend does not "
                              "apply (its kernels attend every stored token)")  # fmt: skip
        rid = int(self.table.add(self._clock(), len(prompt), max_new_tokens)[0])
        self.scheduler.add(np.array([rid]))
        if self.table.status[rid] == Status.REJECTED:
            raise EngineError(f"request of {len(prompt)} prompt tokens + {max_new_tokens} new: "
                              f"{self.table.reject_reason[rid]}")  # fmt: skip
        self.outputs[rid] = Output(rid, list(prompt))
        self.stop_ids[rid] = set(stop_ids)
        self.sampler.add(rid, sampling)
        return rid

    def abort(self, rid: int) -> bool:
        """Withdraw a request between iterations (its client went away): its KV is freed now. False if it had
        already finished."""
        if not self.scheduler.abort(rid, self._clock()):
            return False
        self._finish(rid, "abort")
        return True

    def forget(self, rid: int) -> Output:
        """Drop a finished request's tokens and settings (a server's requests would otherwise pile up); returns
        its output. Its row in the request table (a few numbers) stays."""
        if not self.outputs[rid].finished:
            raise EngineError(f"request {rid} has not finished; abort it first")
        self.stop_ids.pop(rid)
        return self.outputs.pop(rid)

    def _finish(self, rid: int, reason: str) -> None:
        out = self.outputs[rid]
        out.finished, out.finish_reason = True, reason
        self._release(rid)
        self.sampler.drop(rid)

    def _clock(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def busy(self) -> bool:
        return bool(len(self.queue) or len(self.scheduler.running))

    # --- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[tuple[int, int]]:
        """One iteration: (request id, new token) for each token produced."""
        plan = self.scheduler.schedule(self._clock())
        for rid in [r for r in self.blocks.tables if self.table.status[r] != Status.RUNNING]:
            self._release(rid)  # preempted by this schedule: its KV is gone, it will re-prefill
        if plan.empty:
            return []
        start = self._clock()
        timing, produced = self.execute(plan)
        for rid, tok in produced:  # a stop token ends the request now: the commit below finishes it
            out = self.outputs[rid]
            out.tokens.append(tok)
            if tok in self.stop_ids[rid]:
                self.table.output[rid] = self.table.generated[rid] + 1
                out.finish_reason = "stop"
        self.scheduler.observe(plan, timing)
        for rid in self.scheduler.commit(plan, start + timing.duration).tolist():
            self._finish(rid, self.outputs[rid].finish_reason or "length")
        self.iterations += 1
        return produced

    def _release(self, rid: int) -> None:
        self.blocks.release(rid)
        self.attention.free(rid)

    def execute(self, plan: Plan) -> tuple[IterationTiming, list[tuple[int, int]]]:
        """Run both sub-batches of `plan` (interleaved where the engine overlaps them, else one after the other)
        and time each one's dense part and attention part (what the predictors learn from)."""
        gpu, mem = np.zeros((1, 2)), np.zeros((1, 2))
        produced: list[tuple[int, int]] = []
        t0 = time.perf_counter()
        subs = [(x, sb) for x in (0, 1) if not (sb := plan.sub_batch(x)).empty]
        if self.overlap and len(subs) == 2:
            produced = self._run_pair(subs[0][1], subs[1][1], gpu, mem)
        else:
            for x, sb in subs:
                produced += self._run(sb, gpu, mem, x)
        d = np.array([time.perf_counter() - t0])
        stats = {}
        sim = self.attention.simulated_step_s(self.table.context(plan.decode_ids[plan.decode_on_device]))
        if sim is not None:  # what the emulated device would take for this step's decodes
            self.pim_simulated_s += sim
            stats["pim_simulated_s"] = np.array([sim])
        return IterationTiming(d, {"gpu": gpu.sum(axis=1), "memory": mem.sum(axis=1)}, sub_gpu_s=gpu,
                               sub_mem_s=mem, stats=stats), produced  # fmt: skip

    def _inputs(self, sb: Plan) -> tuple[list[Segment], torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """A sub-batch as the model takes it: its requests' segments (KV blocks ensured), the flat batch of
        tokens and their positions, and (request id, row) of each row whose logits give a new token."""
        t = self.table
        segments, feed, positions, sampled = [], [], [], []
        row = 0
        for rid in sb.decode_ids.tolist():
            ctx = int(t.prompt[rid] + t.generated[rid])
            blocks = self.blocks.ensure(rid, int(t.kv_tier[rid]), ctx)
            segments.append(Segment(rid, row, 1, ctx - 1, tuple(blocks)))
            feed += self.outputs[rid].ids(ctx - 1, ctx)
            positions.append(ctx - 1)
            sampled.append((rid, row))
            row += 1
        prefills = zip(sb.prefill_ids.tolist(), sb.prefill_chunks.tolist(), sb.prefill_prefix.tolist(),
                       sb.prefill_completes.tolist(), strict=True)  # fmt: skip
        for rid, chunk, prefix, done in prefills:
            blocks = self.blocks.ensure(rid, int(t.kv_tier[rid]), prefix + chunk)
            segments.append(Segment(rid, row, chunk, prefix, tuple(blocks)))
            feed += self.outputs[rid].ids(prefix, prefix + chunk)
            positions += range(prefix, prefix + chunk)
            row += chunk
            if done:
                sampled.append((rid, row - 1))
        dev = self.runner.device
        return segments, torch.tensor(feed, device=dev), torch.tensor(positions, device=dev), sampled

    def _run(self, sb: Plan, gpu: np.ndarray, mem: np.ndarray, x: int) -> list[tuple[int, int]]:
        segments, tokens, positions, sampled = self._inputs(sb)
        attn_s = [0.0]
        self.attention.bind(segments)

        def timed(layer, q, k, v):
            a = time.perf_counter()
            out = self.attention(layer, q, k, v)
            attn_s[0] += time.perf_counter() - a
            return out

        t0 = time.perf_counter()
        logits = self.runner.forward(tokens, positions, timed, self._rows(sampled))
        total = time.perf_counter() - t0
        mem[0, x], gpu[0, x] = attn_s[0], total - attn_s[0]
        return self._sample(sampled, logits)

    def _run_pair(self, sb0: Plan, sb1: Plan, gpu: np.ndarray, mem: np.ndarray) -> list[tuple[int, int]]:
        """Both sub-batches interleaved (`DecoderRunner.forward_pair`), each attended by its own view of the
        backend."""
        ins = [self._inputs(sb) for sb in (sb0, sb1)]
        views = [self.attention.bound(segments) for segments, *_ in ins]
        batches = [(tokens, positions, self._rows(sampled)) for _, tokens, positions, sampled in ins]
        res = self.runner.forward_pair(batches, views, self.link)
        gpu[0], mem[0] = res.dense_s, res.attention_s
        return [p for (*_, sampled), logits in zip(ins, res.logits, strict=True) for p in self._sample(sampled, logits)]

    def _rows(self, sampled: list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor([r for _, r in sampled], dtype=torch.long, device=self.runner.device)

    def _sample(self, sampled: list[tuple[int, int]], logits: torch.Tensor) -> list[tuple[int, int]]:
        """(request id, next token) of each sampled row from its logits (kept where `self.logits` asks)."""
        if self.logits is not None:
            for (rid, _), row in zip(sampled, logits.cpu().numpy(), strict=True):
                self.logits.setdefault(rid, []).append(row)
        rids = [rid for rid, _ in sampled]
        return list(zip(rids, self.sampler(logits, rids), strict=True))

    # --- conveniences -------------------------------------------------------------------------------
    def stream(self) -> Iterator[tuple[int, int]]:
        """Run until every request has finished, yielding (request id, token) as they are produced."""
        while self.busy:
            yield from self.step()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:  # fmt: skip
        """Greedy continuations of `prompts`, served together in one continuous batch."""
        rids = [self.add_request(p, max_new_tokens, stop_ids) for p in prompts]
        for _ in self.stream():
            pass
        return [self.outputs[r].tokens for r in rids]
