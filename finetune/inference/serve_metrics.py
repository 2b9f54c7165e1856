"""`GET /metrics` of `finetune serve`: Prometheus text from prometheus_client, in a registry of the server's own.

Requests by model, endpoint and HTTP status (499: the client went away first), prompt and completion tokens by model,
request latency and time to first token by model and endpoint, and each engine's queue depth, running rows and
forward passes read when scraped. The model label only ever holds served names: a request for an unknown model counts
under model="" so a client cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds: a tiny model on a CPU answers in tens of milliseconds, a 20B model's long completion in minutes
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The server's counters and histograms, plus gauges read from its engines (by engine name) at each scrape."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engines: dict):
        disable_created_metrics()  # no *_created series: a timestamp per label set, twice the lines, unused here
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "finetune_serve_requests",
            "HTTP requests answered, by served model, endpoint and status code (499: the client disconnected)",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "finetune_serve_prompt_tokens",
            "prompt tokens of generation requests (once per prompt, whatever n)",
            ["model"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "finetune_serve_completion_tokens", "tokens generated (EOS included)", ["model"], registry=self.registry
        )
        self.latency = Histogram(
            "finetune_serve_request_duration_seconds",
            "time from a generation request's arrival to its last byte",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "finetune_serve_time_to_first_token_seconds",
            "time from a generation request's arrival to its first generated text",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Engines(engines))

    def answered(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()

    def generated(self, model: str, endpoint: str, prompt: int, completion: int, seconds: float) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)
        self.latency.labels(model, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Engines:
    """Queue depth, running rows and steps of each engine, read when Prometheus scrapes (no stale copies)."""

    def __init__(self, engines: dict):
        self.engines = engines

    def describe(self):
        return []  # collected on demand only: the registry must not call collect() at registration

    def collect(self):
        queued = GaugeMetricFamily("finetune_serve_queue_depth", "requests waiting for a batch row", labels=["engine"])
        running = GaugeMetricFamily("finetune_serve_running", "requests decoding in the batch", labels=["engine"])
        steps = CounterMetricFamily("finetune_serve_engine_steps", "forward passes of the engine", labels=["engine"])
        for name, engine in self.engines.items():
            queued.add_metric([name], engine.queue_depth)
            running.add_metric([name], engine.running)
            steps.add_metric([name], engine.steps)
        yield from (queued, running, steps)
