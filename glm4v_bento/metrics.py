"""Prometheus metrics of the service, served on BentoML's /metrics beside its own.

Created in the worker process (``get_metrics`` from the service's ``__init__``), after
BentoML has set up multi-process collection, so they appear on /metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import lru_cache

from glm4v_bento.engine import GenerationResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class ServiceMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.queue_depth = Gauge(
            "glm4v_queue_depth", "Requests waiting for a place in the batch", multiprocess_mode="livemax"
        )
        self.running = Gauge("glm4v_running_sequences", "Requests in the running batch", multiprocess_mode="livemax")
        self.occupancy = Histogram(
            "glm4v_batch_occupancy", "Rows in the batch at each decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.time_to_first_token = Histogram(
            "glm4v_time_to_first_token_seconds", "Submit to first token (queue + prefill)", buckets=_LATENCY_BUCKETS
        )
        self.inter_token_latency = Histogram(
            "glm4v_inter_token_latency_seconds",
            "Average time between two tokens of a request",
            buckets=_TOKEN_LATENCY_BUCKETS,
        )
        self.prompt_tokens = Counter("glm4v_prompt_tokens", "Prompt tokens processed (image tokens included)")
        self.generated_tokens = Counter("glm4v_generated_tokens", "Tokens generated")
        self.requests = Counter(
            "glm4v_requests", "Finished generations by finish reason (cancelled: the client left)", ["finish_reason"]
        )
        self.cache = Counter("glm4v_result_cache", "Result cache lookups", ["outcome"])
        self.rejections = Counter("glm4v_rejections", "Requests refused, by reason", ["reason"])
        self.clients_left = Counter(
            "glm4v_clients_left", "Requests whose client went away before the answer (their generations stopped)"
        )
        self.redis_failures = Counter(
            "glm4v_redis_failures", "Calls to Redis that failed (the request went on without it), by use", ["use"]
        )
        self.decode_path = Gauge(
            "glm4v_decode_fast_path",
            "1 while decode steps use it: compiled (torch.compile) or cuda_graphs; 0 if off or turned off",
            ["path"],
            multiprocess_mode="livemax",
        )
        self._last_gauges = 0.0
        self._lock = threading.Lock()

    def observe_result(self, result: GenerationResult) -> None:
        self.requests.labels(result.finish_reason).inc()
        if result.finish_reason == "error":
            return
        self.prompt_tokens.inc(result.usage.prompt_tokens)
        self.generated_tokens.inc(result.usage.completion_tokens)
        if result.usage.completion_tokens:
            self.time_to_first_token.observe(result.timings.queue_s + result.timings.prefill_s)
        if result.usage.completion_tokens > 1:
            self.inter_token_latency.observe(result.timings.decode_s / (result.usage.completion_tokens - 1))

    def observe_step(
        self, running: int, waiting: int, decode_path: Callable[[], dict[str, bool | int]] | None = None
    ) -> None:
        """Called by the scheduler at every step: occupancy always, gauges a few times a second.
        ``decode_path`` is the runner's (read with the gauges): a fast path turned off shows here."""
        self.occupancy.observe(running)
        now = time.monotonic()
        if now - self._last_gauges >= 0.25 or running == 0:  # always report going idle
            with self._lock:
                self._last_gauges = now
                self.running.set(running)
                self.queue_depth.set(waiting)
                if decode_path is not None:
                    now_used = decode_path()
                    for path in ("compiled", "cuda_graphs"):
                        self.decode_path.labels(path).set(int(bool(now_used[path])))

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def cache_lookup(self, hit: bool) -> None:
        self.cache.labels("hit" if hit else "miss").inc()


@lru_cache(maxsize=1)
def get_metrics() -> ServiceMetrics:
    return ServiceMetrics()
