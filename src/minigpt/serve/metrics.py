"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus_client).

What vLLM and TGI expose, under `minigpt_`: requests by endpoint and HTTP status, tokens generated,
requests running and waiting, batch rows in use and the batch's size, decode steps and the rows they
decoded (rate(row_steps) / rate(steps) = mean batch occupancy), time-to-first-token and request
latency histograms. Each app has its own registry, so several servers in one process (the tests) do
not share counts. Batch figures are read from the batcher when scraped, not pushed per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from a few decode steps of a small model on a CPU to a long completion under load
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _BatchCollector:
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, doc, key in (
            ("minigpt_requests_running", "Requests holding rows in the batch", "running"),
            ("minigpt_requests_waiting", "Requests waiting for rows", "waiting"),
            ("minigpt_batch_rows_in_use", "Batch rows held by requests", "rows_in_use"),
            ("minigpt_batch_rows", "Rows in the batch (--max-concurrency)", "rows"),
        ):
            yield GaugeMetricFamily(name, doc, value=s[key])
        for name, doc, key in (
            ("minigpt_generated_tokens", "Tokens generated", "tokens_generated"),
            ("minigpt_decode_steps", "Batched decode steps run", "steps"),
            ("minigpt_decode_row_steps", "Rows decoded, summed over decode steps", "row_steps"),
            ("minigpt_prompt_tokens_prefilled", "Prompt tokens computed by a forward",
             "prompt_tokens_prefilled"),
            ("minigpt_prompt_cache_hits", "Requests that reused a kept prefix", "prompt_cache_hits"),
            ("minigpt_prompt_tokens_reused", "Prompt tokens copied from the prompt cache instead of "
             "computed", "prompt_tokens_reused"),
        ):
            yield CounterMetricFamily(name, doc, value=s[key])


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("minigpt_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("minigpt_time_to_first_token_seconds",
                              "Request received -> first generated text ready to send",
                              buckets=BUCKETS, registry=self.registry)
        self.latency = Histogram("minigpt_request_latency_seconds",
                                 "Request received -> last generated text ready to send",
                                 buckets=BUCKETS, registry=self.registry)
        self.registry.register(_BatchCollector(stats))

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")


class StatusCounter:
    """ASGI middleware counting every HTTP answer by endpoint and status. Plain ASGI, not
    BaseHTTPMiddleware: that one wraps streaming bodies and hides client disconnects."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else (
            "/v1/models/{id}" if path.startswith("/v1/models/") else
            path if path in ("/", "/health", "/metrics") else "other")

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
