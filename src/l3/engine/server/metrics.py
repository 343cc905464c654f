"""The server's Prometheus metrics (text format at GET /metrics), in a registry of its own per server.

Counters and histograms are updated on the engine thread as tokens are produced; the gauges (requests running
and waiting, KV blocks per tier, predictor errors) are read from the engine at each scrape, between iterations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from l3.engine.engine import Engine

# Bucket bounds (s). TTFT spans a short prompt at an idle server to a long one behind a queue; TBT a step of a
# small model on a GPU to a CPU step of a big batch.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
PREFIX = "l3_"

disable_created_metrics()  # no *_created series: a scrape shows only what is measured


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "token", buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.tbt = Histogram(PREFIX + "time_between_tokens_seconds", "Time between a request's consecutive tokens",
                             buckets=TBT_BUCKETS, registry=r)  # fmt: skip
        self.generated_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests added", registry=r)
        self.finished = Counter(PREFIX + "requests_finished", "Requests ended, by reason (length, stop, abort, "
                                "error)", ["reason"], registry=r)  # fmt: skip
        self.running = Gauge(PREFIX + "requests_running", "Requests in the batch (prefilling or decoding)",
                             registry=r)  # fmt: skip
        self.waiting = Gauge(PREFIX + "requests_waiting", "Requests waiting for admission", registry=r)
        self.kv_used = Gauge(PREFIX + "kv_blocks_used", "KV blocks held by requests", ["tier"], registry=r)
        self.kv_total = Gauge(PREFIX + "kv_blocks_total", "KV blocks of the tier", ["tier"], registry=r)
        self.kv_block_tokens = Gauge(PREFIX + "kv_block_size_tokens", "Tokens per KV block", registry=r)
        self.predictor_error = Gauge(PREFIX + "predictor_relative_error", "Relative error of the scheduler's "
                                     "time predictors on measured iterations, by side and statistic",
                                     ["side", "stat"], registry=r)  # fmt: skip

    def refresh(self, engine: Engine) -> None:
        """Read the gauges from the engine (on the engine thread)."""
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.queue))
        kv = engine.scheduler.kv
        self.kv_block_tokens.set(kv.block_size)
        for tier, (used, total) in enumerate(zip(kv.tier_used.tolist(), kv.tier_capacity.tolist(), strict=True)):
            self.kv_used.labels(tier=str(tier)).set(used)
            self.kv_total.labels(tier=str(tier)).set(total)
        report = engine.scheduler.report()
        # The attention side (PIM, or the host CPU standing in for it) and the dense side; a scheduler without
        # predictors (one batch, the gpu backend) reports none.
        for key, side in (("pim", "attention"), ("gpu", "dense")):
            summary = report.get(f"{key}_predictor_error") or {}
            for stat in ("median", "p90"):
                if summary.get(stat) is not None:
                    self.predictor_error.labels(side=side, stat=stat).set(summary[stat])

    def text(self) -> bytes:
        return generate_latest(self.registry)
