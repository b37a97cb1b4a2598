"""Redis down: the shared rate limits and result cache step aside, and requests go on."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import redis
from conftest import encode, make_image
from test_result_cache import result

from glm4v_bento.devserver import Server, free_port
from glm4v_bento.rate_limit import RateLimiter, RedisBuckets
from glm4v_bento.redis_guard import RedisGuard
from glm4v_bento.result_cache import RedisResultCache

UNREACHABLE = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


def test_a_failure_falls_back_pauses_redis_and_warns_once_a_minute(caplog):
    failures, calls = [], []

    def down():
        calls.append(1)
        raise redis.ConnectionError("Error 111 connecting to cache:6379. Connection refused.")

    guard = RedisGuard("rate limits", "Rate limits are not enforced", lambda: failures.append(1), pause_s=0.2)
    with caplog.at_level(logging.WARNING, logger="glm4v_bento.redis_guard"):
        assert guard.call(down, "fallback") == "fallback"
        assert guard.call(down, "fallback") == "fallback"  # paused: Redis is not tried
        assert len(calls) == 1
        time.sleep(0.25)
        assert guard.call(down, "fallback") == "fallback"  # tried again after the pause, failed again
        assert len(calls) == 2 and len(failures) == 2
        assert guard.call(lambda: "answer", "fallback") == "fallback"  # still paused
        time.sleep(0.25)
        assert guard.call(lambda: "answer", "fallback") == "answer"  # Redis is back
    [warning] = caplog.records  # the second failure came within the minute
    assert "Redis (rate limits) failed: Error 111" in warning.message
    assert "Rate limits are not enforced until it answers again" in warning.message


def test_errors_that_are_not_redis_failures_are_not_hidden():
    guard = RedisGuard("result cache", "Nothing is cached")
    with pytest.raises(ZeroDivisionError):
        guard.call(lambda: 1 / 0, None)


def test_unreachable_redis_lets_requests_in_and_caches_nothing():
    failures: list[str] = []
    limiter = RateLimiter(
        RedisBuckets(UNREACHABLE, on_failure=lambda: failures.append("limit")),
        requests_per_minute=1,
        tokens_per_minute=10,
    )
    started = time.monotonic()
    assert all(limiter.admit("alice")[0].allowed for _ in range(5))  # 1 per minute, were Redis up
    limiter.buckets.charge("tok:alice", 10, 10 / 60, 500)
    cache = RedisResultCache(UNREACHABLE, ttl_s=60, on_failure=lambda: failures.append("cache"))
    assert cache.get("key") is None
    cache.put("key", result("an answer"))
    assert time.monotonic() - started < 2
    assert failures == ["limit", "cache"]  # after a failure, each waits before trying again


def test_the_server_answers_while_its_redis_is_down(tiny_model_dir, tmp_path):
    """Before: each rate-limited request hung until the request timeout and was then dropped."""
    with Server(
        tiny_model_dir,
        tmp_path / "serve.log",
        GLM4V_REDIS_URL=UNREACHABLE,
        GLM4V_RATE_LIMIT_RPM="1",
        GLM4V_RESULT_CACHE_BYTES="1000000",
    ) as server:
        for _ in range(3):
            response = httpx.post(
                f"{server.url}/v1/vision/inference",
                files={"image_file": ("a.png", encode(make_image(30, 30)), "image/png")},
                data={"request_data": '{"text_prompt": "x", "max_tokens": 2}'},
                timeout=20,
            )
            assert response.status_code == 200, response.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        log = server.log()
    assert 'glm4v_redis_failures_total{use="rate_limit"}' in metrics
    assert 'glm4v_redis_failures_total{use="result_cache"}' in metrics
    assert "Redis (rate limits) failed" in log and "Rate limits are not enforced" in log
