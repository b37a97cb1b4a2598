"""Token buckets for requests and generated tokens, in memory and in a real Redis."""

from __future__ import annotations

import time

import pytest

from glm4v_bento.rate_limit import MemoryBuckets, RateLimiter, RedisBuckets


@pytest.fixture(params=["memory", "redis"])
def buckets(request, redis_url):
    if request.param == "memory":
        return MemoryBuckets()
    shared = RedisBuckets(redis_url, prefix=f"test:{time.time_ns()}:")
    return shared


def test_requests_per_minute(buckets):
    limiter = RateLimiter(buckets, requests_per_minute=3, tokens_per_minute=None)
    assert [limiter.admit("alice")[0].allowed for _ in range(4)] == [True, True, True, False]
    decision, limit = limiter.admit("alice")
    assert not decision.allowed and limit == "3 requests per minute"
    assert 0 < decision.retry_after_s <= 20  # one request comes back every 20 s
    assert limiter.admit("bob")[0].allowed  # limits are per client


def test_generated_tokens_are_charged_after_the_fact(buckets):
    limiter = RateLimiter(buckets, requests_per_minute=None, tokens_per_minute=600)
    assert limiter.admit("carol")[0].allowed
    limiter.charge_tokens("carol", 650)  # the answer was longer than the whole budget: debt
    decision, limit = limiter.admit("carol")
    assert not decision.allowed and limit == "600 generated tokens per minute"
    assert decision.retry_after_s == pytest.approx(5, abs=1)  # 50 tokens of debt at 10 per second


def test_buckets_refill(buckets):
    limiter = RateLimiter(buckets, requests_per_minute=600, tokens_per_minute=None)  # 10 per second
    # Drain the bucket until refused (it refills while the 600 calls run: by how much depends on
    # the machine's speed, so no fixed count is right).
    admitted = 0
    while limiter.admit("dave")[0].allowed and admitted < 2000:
        admitted += 1
    assert 600 <= admitted < 2000
    time.sleep(0.25)
    assert limiter.admit("dave")[0].allowed


def test_two_limiters_on_one_redis_share_the_limit(redis_url):
    prefix = f"shared:{time.time_ns()}:"
    first = RateLimiter(RedisBuckets(redis_url, prefix), requests_per_minute=4, tokens_per_minute=None)
    second = RateLimiter(RedisBuckets(redis_url, prefix), requests_per_minute=4, tokens_per_minute=None)
    outcomes = [limiter.admit("erin")[0].allowed for limiter in (first, second, first, second, first)]
    assert outcomes == [True, True, True, True, False]
