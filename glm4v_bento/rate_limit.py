"""Rate limits per API key (per client address when keys are off): requests and generated tokens.

Two token buckets per client, refilled continuously: one for requests per minute, one for
generated tokens per minute. A request is let in when its request bucket has a token and its
token bucket is not in debt; the tokens it generates are charged when it ends (the count is
only known then), which can take the bucket into debt until it refills. Refusals are 429s
with Retry-After. Buckets live in memory (one replica) or in Redis (GLM4V_REDIS_URL), so
several replicas enforce one shared limit.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import anyio

from glm4v_bento.http_limits import ASGIApp, Receive, Scope, Send, is_internal, reply_error
from glm4v_bento.redis_guard import RedisGuard

# Charges to remote buckets, made in order off the event loop.
_background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4v-rate-limit")

# Who the current request is, for charging its generated tokens when it ends.
current_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("glm4v_client", default=None)

EXEMPT_PATHS = frozenset({"/health", "/livez", "/readyz", "/healthz", "/metrics", "/model/info", "/", "/docs.json"})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0


class Buckets(Protocol):
    def take(self, key: str, capacity: float, per_second: float, cost: float) -> Decision:
        """Take ``cost`` if the bucket holds that much (cost 0: only check it is not in debt)."""

    def charge(self, key: str, capacity: float, per_second: float, cost: float) -> None:
        """Take ``cost`` unconditionally (the bucket may go into debt)."""


class MemoryBuckets:
    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def _refilled(self, key: str, capacity: float, per_second: float, now: float) -> float:
        tokens, then = self._state.get(key, (capacity, now))
        return min(capacity, tokens + (now - then) * per_second)

    def take(self, key: str, capacity: float, per_second: float, cost: float) -> Decision:
        with self._lock:
            now = time.monotonic()
            tokens = self._refilled(key, capacity, per_second, now)
            need = max(cost, 1e-9)
            if tokens >= need or (cost == 0 and tokens >= 0):
                self._state[key] = (tokens - cost, now)
                return Decision(True)
            self._state[key] = (tokens, now)
            return Decision(False, (need - tokens) / per_second)

    def charge(self, key: str, capacity: float, per_second: float, cost: float) -> None:
        with self._lock:
            now = time.monotonic()
            self._state[key] = (self._refilled(key, capacity, per_second, now) - cost, now)


# Atomic refill-and-take in Redis. ARGV: capacity, per_second, cost, now (s), conditional (1/0).
_LUA = """
local capacity, rate, cost, now, conditional = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 1
local need = math.max(cost, 1e-9)
if conditional == 1 and not (tokens >= need or (cost == 0 and tokens >= 0)) then
  allowed = 0
else
  tokens = tokens - cost
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return {allowed, tostring(tokens)}
"""


class RedisBuckets:
    """Buckets shared by every replica that uses the same Redis. While Redis cannot be reached,
    every request is let in (see redis_guard)."""

    def __init__(self, url: str, prefix: str = "glm4v:rl:", on_failure: Callable[[], None] | None = None) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._script = self._redis.register_script(_LUA)
        self._prefix = prefix
        self._guard = RedisGuard("rate limits", "Rate limits are not enforced", on_failure)

    def _run(self, key: str, capacity: float, per_second: float, cost: float, conditional: bool) -> tuple[bool, float]:
        now = self._redis.time()  # one clock for every replica
        seconds = now[0] + now[1] / 1e6
        allowed, tokens = self._script(
            keys=[self._prefix + key], args=[capacity, per_second, cost, seconds, 1 if conditional else 0]
        )
        return bool(allowed), float(tokens)

    def take(self, key: str, capacity: float, per_second: float, cost: float) -> Decision:
        allowed, tokens = self._guard.call(lambda: self._run(key, capacity, per_second, cost, True), (True, 0.0))
        return Decision(True) if allowed else Decision(False, (max(cost, 1e-9) - tokens) / per_second)

    def charge(self, key: str, capacity: float, per_second: float, cost: float) -> None:
        self._guard.call(lambda: self._run(key, capacity, per_second, cost, False), None)


class RateLimiter:
    def __init__(self, buckets: Buckets, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.buckets = buckets
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def admit(self, client: str) -> tuple[Decision, str]:
        """May ``client`` start a request now? (decision, which limit refused)."""
        if self.tpm:
            decision = self.buckets.take(f"tok:{client}", self.tpm, self.tpm / 60, 0)
            if not decision.allowed:
                return decision, f"{self.tpm} generated tokens per minute"
        if self.rpm:
            decision = self.buckets.take(f"req:{client}", self.rpm, self.rpm / 60, 1)
            if not decision.allowed:
                return decision, f"{self.rpm} requests per minute"
        return Decision(True), ""

    @property
    def remote(self) -> bool:
        """Buckets behind a network call (Redis): keep such calls off the event loop."""
        return not isinstance(self.buckets, MemoryBuckets)

    def charge_tokens(self, client: str | None, tokens: int) -> None:
        if self.tpm and client and tokens > 0:
            if self.remote:  # called from the event loop: the round trip happens in the background
                _background.submit(self.buckets.charge, f"tok:{client}", self.tpm, self.tpm / 60, tokens)
            else:
                self.buckets.charge(f"tok:{client}", self.tpm, self.tpm / 60, tokens)


class RateLimitMiddleware:
    """Admits or refuses each client request; sets ``current_client`` for later charging."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.limiter = limiter
        self.on_reject = on_reject or (lambda reason: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS or is_internal(scope):
            await self.app(scope, receive, send)
            return
        client = client_identity(scope)
        token = current_client.set(client)
        try:
            if self.limiter.enabled:
                if self.limiter.remote:
                    decision, limit = await anyio.to_thread.run_sync(self.limiter.admit, client)
                else:
                    decision, limit = self.limiter.admit(client)
                if not decision.allowed:
                    self.on_reject("rate_limited")
                    await _too_many(scope, send, limit, decision.retry_after_s)
                    return
            await self.app(scope, receive, send)
        finally:
            current_client.reset(token)


def client_identity(scope: Scope) -> str:
    key = (scope.get("state") or {}).get("glm4v_key_id")
    if key:
        return key
    client = scope.get("client")
    return f"ip-{client[0]}" if client else "ip-unknown"


async def _too_many(scope: Scope, send: Send, limit: str, retry_after_s: float) -> None:
    message = f"rate limit reached ({limit}); retry in {math.ceil(retry_after_s)} s"
    retry = [(b"retry-after", str(max(1, math.ceil(retry_after_s))).encode())]
    await reply_error(scope, send, 429, message, code="rate_limit_exceeded", headers=retry)
