"""The Prometheus metrics behind GET /metrics, in a registry of their own (one per app, so tests can run several).

Names follow vLLM's where one exists (``vllm:time_to_first_token_seconds`` -> ``trilite_time_to_first_token_seconds``),
so dashboards built for it need only the prefix changed.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a millisecond (a small model's decode step on a GPU) to a minute (a long queue on a CPU).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("trilite_requests", "HTTP requests to /v1, by status code", ["status"], registry=r)
        self.aborted = Counter("trilite_requests_aborted", "requests whose client went away before the end",
                               registry=r)
        self.prompt_tokens = Counter("trilite_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("trilite_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("trilite_time_to_first_token_seconds", "from arrival to the first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("trilite_time_per_output_token_seconds", "mean time between a choice's later tokens",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.steps = Counter("trilite_engine_steps", "engine steps run, by kind", ["kind"], registry=r)
        self.batch_size = Histogram("trilite_batch_size", "sequences per engine step, by kind", ["kind"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self._gauges = [("trilite_requests_running", "sequences in the running batch"),
                        ("trilite_requests_waiting", "sequences waiting for a place in the batch or for KV blocks"),
                        ("trilite_kv_blocks_in_use", "KV-cache blocks held by sequences"),
                        ("trilite_kv_blocks_total", "KV-cache blocks of this server"),
                        ("trilite_max_batch_size_seen", "the most sequences one engine step has run"),
                        ("trilite_prefix_cache_hit_tokens", "tokens taken from cached prefixes instead of prefilled")]

    def bind(self, **sources: Callable[[], float]) -> None:
        """Gauges read when scraped: name without the prefix -> a function returning the value."""
        for name, doc in self._gauges:
            Gauge(name, doc, registry=self.registry).set_function(sources[name.removeprefix("trilite_")])

    def render(self) -> bytes:
        return generate_latest(self.registry)
