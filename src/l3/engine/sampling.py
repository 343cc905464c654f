"""Choosing each request's next token from its logits: greedy (temperature 0) or temperature + nucleus (top-p)
sampling with a per-request random stream, so a request's tokens depend on its seed alone, not on what it was
batched with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from l3.errors import EngineError


@dataclass(frozen=True)
class SamplingParams:
    """`temperature` 0 is greedy (argmax); `top_p` keeps the smallest set of most likely tokens whose probability
    reaches it; `seed` fixes the request's random stream (None: drawn from the engine's generator)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise EngineError(f"temperature {self.temperature}: expected a number >= 0")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p {self.top_p}: expected a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


class Sampler:
    """Next tokens of a batch of rows, each row with its request's parameters and random stream."""

    def __init__(self, seed: int = 0):
        self._seeds = torch.Generator().manual_seed(seed)  # draws a stream's seed when a request gives none
        self._sampled: dict[int, tuple[SamplingParams, torch.Generator]] = {}  # requests not greedy

    def add(self, rid: int, params: SamplingParams) -> None:
        if params.greedy:
            return
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
        self._sampled[rid] = params, torch.Generator().manual_seed(seed)

    def drop(self, rid: int) -> None:
        self._sampled.pop(rid, None)

    def __call__(self, logits: torch.Tensor, rids: list[int]) -> list[int]:
        """`logits`: [rows, vocab], row i request rids[i]'s; one token id per row."""
        # the first largest logit of each row either way; numpy's argmax is 4-8x faster than PyTorch's on a CPU
        # (32 rows of SmolLM2's 49,152: 0.3 ms against 1.2-2.4 ms)
        best = logits.numpy().argmax(axis=-1) if logits.device.type == "cpu" else logits.argmax(dim=-1).cpu()
        tokens = best.tolist()
        for i, rid in enumerate(rids):
            if rid in self._sampled:
                tokens[i] = self._draw(logits[i].float().cpu(), *self._sampled[rid])
        return tokens

    @staticmethod
    def _draw(logits: torch.Tensor, p: SamplingParams, stream: torch.Generator) -> int:
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens more likely than each
            sorted_p[before >= p.top_p] = 0  # the most likely token always stays (before = 0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=stream))
