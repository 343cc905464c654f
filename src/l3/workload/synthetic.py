"""Seeded synthetic workloads: length-matched stand-ins for the reasoning datasets, and Poisson arrivals.

Each length (prompt, output) is drawn from a lognormal whose mean and standard deviation equal the dataset's
published ones: sigma^2 = ln(1 + (std/mean)^2), mu = ln(mean) - sigma^2 / 2. Draws use Latin hypercube
sampling (one uniform per equal-probability stratum, strata shuffled), so each request is marginally lognormal
while even a 1,000-request run matches the targets closely. Prompt and output are drawn independently.
Lengths are rounded to whole tokens and clipped to >= 1; then prompts are clipped to MAX_CONTEXT - 1 and
outputs to MAX_CONTEXT - prompt (a truncated generation), and the number of clipped outputs is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from l3.errors import WorkloadError
from l3.workload.workload import Workload

MAX_CONTEXT = 131072  # tokens: prompt + output of one synthetic request
DEFAULT_N = 1000  # requests per run in the paper's evaluation

# Independent random streams derived from one user seed, so e.g. changing the arrival rate keeps the lengths.
STREAM_LENGTHS, STREAM_SAMPLE, STREAM_ARRIVALS = 0, 1, 2


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """The numpy Generator for one named stream of a user seed."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


@dataclass(frozen=True)
class LengthSet:
    """Published input/output length moments (tokens) of a dataset; divisor scales lengths down."""

    dataset: str
    prompt_mean: float
    prompt_std: float
    output_mean: float
    output_std: float
    divisor: int = 1


SYNTHETIC: dict[str, LengthSet] = {
    "openr1": LengthSet("OpenR1-Math-220k", 96.0, 75.1, 12684.0, 8465.0),
    "dolphin-r1": LengthSet("Dolphin-r1", 201.9, 563.0, 3926.0, 4216.0),
    "openthoughts": LengthSet("OpenThoughts-114k-math", 89.4, 66.7, 6367.0, 4663.0),
    "dolphin-short": LengthSet("Dolphin-r1", 201.9, 563.0, 3926.0, 4216.0, divisor=10),
}


def lognormal_params(mean: float, std: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal with the given mean and standard deviation."""
    sigma2 = np.log1p((std / mean) ** 2)
    return float(np.log(mean) - sigma2 / 2), float(np.sqrt(sigma2))


def lhs_lognormal(rng: np.random.Generator, n: int, mean: float, std: float) -> np.ndarray:
    """n Latin-hypercube draws (float tokens) from the moment-matched lognormal."""
    mu, sigma = lognormal_params(mean, std)
    u = (rng.permutation(n) + rng.random(n)) / n
    return np.exp(mu + sigma * ndtri(u))


def synthetic_workload(name: str, n: int = DEFAULT_N, seed: int = 0) -> Workload:
    """Offline workload of n requests matched to SYNTHETIC[name] (a divisor set reuses the base draws)."""
    spec = SYNTHETIC[name]
    rng = rng_for(seed, STREAM_LENGTHS)
    prompt = np.maximum(np.rint(lhs_lognormal(rng, n, spec.prompt_mean, spec.prompt_std)), 1).astype(np.int64)
    output = np.maximum(np.rint(lhs_lognormal(rng, n, spec.output_mean, spec.output_std)), 1).astype(np.int64)
    prompt = np.minimum(prompt, MAX_CONTEXT - 1)
    clipped = int(np.count_nonzero(prompt + output > MAX_CONTEXT))
    output = np.minimum(output, MAX_CONTEXT - prompt)
    if spec.divisor > 1:  # round half up, at least 1 token
        prompt = np.maximum((prompt + spec.divisor // 2) // spec.divisor, 1)
        output = np.maximum((output + spec.divisor // 2) // spec.divisor, 1)
    scaled = f" / {spec.divisor}" if spec.divisor > 1 else ""
    source = (
        f"synthetic {spec.dataset}{scaled}: Latin-hypercube lognormal lengths matched to prompt mean/std "
        f"{spec.prompt_mean}/{spec.prompt_std}, output mean/std {spec.output_mean:.0f}/{spec.output_std:.0f} "
        f"tokens, max context {MAX_CONTEXT} ({clipped} outputs clipped), n={n}, seed={seed}"
    )
    return Workload(
        name=name, arrival_s=np.zeros(n), prompt_len=prompt, output_len=output, mode="offline", source=source
    )


def fixed_workload(name: str, n: int = DEFAULT_N) -> Workload:
    """Offline workload of n identical requests, named "fixed:PROMPT:OUTPUT" (tokens), for context sweeps."""
    try:
        _, p, o = name.split(":")
        prompt, output = int(p), int(o)
    except ValueError:
        raise WorkloadError(f"workload {name!r}: expected fixed:PROMPT:OUTPUT with integer token counts") from None
    if prompt < 1 or output < 1 or prompt + output > MAX_CONTEXT:
        raise WorkloadError(f"workload {name!r}: need PROMPT, OUTPUT >= 1 and PROMPT + OUTPUT <= {MAX_CONTEXT}")
    return Workload(name=name, arrival_s=np.zeros(n), prompt_len=np.full(n, prompt, np.int64),
                    output_len=np.full(n, output, np.int64), mode="offline",
                    source=f"fixed lengths: {n} requests of {prompt} prompt and {output} output tokens")  # fmt: skip


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """n arrival times (s) of a Poisson process at `rate` requests/s (exponential gaps from t=0)."""
    return np.cumsum(rng_for(seed, STREAM_ARRIVALS).exponential(1.0 / rate, n))
