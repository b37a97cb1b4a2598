"""Calls to Redis that the server can do without: when Redis cannot be reached, requests go on.

Redis holds the rate limits shared by replicas and the shared result cache. Neither is worth
failing or stalling a request for, so during an outage the limits are not enforced and the
cache is bypassed; a warning says so (at most once a minute) and a counter counts each failure.
After a failure Redis is left alone for a few seconds, so an unreachable host does not add its
connection timeout to every request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RedisGuard:
    def __init__(
        self,
        use: str,
        consequence: str,
        on_failure: Callable[[], None] | None = None,
        pause_s: float = 5.0,
        warn_every_s: float = 60.0,
    ) -> None:
        """``use``: what Redis serves here; ``consequence``: what a failure means for requests."""
        self.use, self.consequence = use, consequence
        self.on_failure = on_failure
        self.pause_s, self.warn_every_s = pause_s, warn_every_s
        self._paused_until = 0.0
        self._last_warning = -float("inf")

    def call(self, action: Callable[[], T], fallback: T) -> T:
        """``action()``, or ``fallback`` when Redis fails or failed less than ``pause_s`` ago."""
        if time.monotonic() < self._paused_until:
            return fallback
        try:
            return action()
        except redis.RedisError as exc:
            self._failed(exc)
            return fallback

    def _failed(self, exc: redis.RedisError) -> None:
        now = time.monotonic()
        self._paused_until = now + self.pause_s
        if self.on_failure is not None:
            self.on_failure()
        if now - self._last_warning >= self.warn_every_s:
            self._last_warning = now
            logger.warning(
                "Redis (%s) failed: %s. %s until it answers again (tried every %.0f s)",
                self.use,
                str(exc).rstrip("."),
                self.consequence,
                self.pause_s,
            )
