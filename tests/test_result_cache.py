"""The result cache: what is cacheable, what the key covers, and the LRU's byte bound."""

from __future__ import annotations

import pytest

from glm4v_bento.engine import GenerationResult, SamplingDefaults, SamplingParams, Timings, Usage
from glm4v_bento.result_cache import MemoryResultCache, RedisResultCache, cache_key, is_deterministic


def result(text: str) -> GenerationResult:
    return GenerationResult(
        text=text,
        thinking="",
        answer=text,
        finish_reason="length",
        usage=Usage(prompt_tokens=3, completion_tokens=len(text), total_tokens=3 + len(text)),
        timings=Timings(queue_s=0, prefill_s=0, decode_s=0, total_s=0),
    )


def key(**overrides) -> str:
    base = {
        "model": "m",
        "revision": "r1",
        "images": [b"png-bytes"],
        "prompt": "p",
        "system": None,
        "history": [],
        "params": SamplingParams(max_new_tokens=8),
    }
    return cache_key(**{**base, **overrides})


def test_only_deterministic_requests_are_cacheable():
    assert is_deterministic(SamplingParams(temperature=0))
    assert is_deterministic(SamplingParams(temperature=0.7, seed=1))
    assert not is_deterministic(SamplingParams(temperature=0.7))


def test_whether_a_request_is_deterministic_depends_on_the_models_defaults():
    unset = SamplingParams(max_new_tokens=8)
    assert is_deterministic(unset.with_defaults(SamplingDefaults()))
    assert not is_deterministic(unset.with_defaults(SamplingDefaults(temperature=0.8)))
    with pytest.raises(ValueError, match="defaults"):  # never guessed before they are applied
        is_deterministic(unset)


def test_the_key_covers_every_input_that_changes_the_output():
    same = key()
    assert key() == same
    for change in [
        {"images": [b"other-bytes"]},
        {"prompt": "q"},
        {"system": "s"},
        {"revision": "r2"},
        {"model": "n"},
        {"params": SamplingParams(max_new_tokens=9)},
        {"params": SamplingParams(max_new_tokens=8, stop=["x"])},
        {"history": [("user", "earlier", [])]},
    ]:
        assert key(**change) != same, change


def test_lru_is_bounded_in_bytes_and_keeps_recent_entries():
    one = len(result("a" * 100).model_dump_json())
    cache = MemoryResultCache(max_bytes=one * 2 + 10)
    cache.put("a", result("a" * 100))
    cache.put("b", result("b" * 100))
    assert cache.get("a") is not None  # "a" becomes the most recent
    cache.put("c", result("c" * 100))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2
    cache.put("huge", result("h" * 10_000))  # larger than the whole cache: not kept
    assert cache.get("huge") is None


def test_redis_cache_round_trip(redis_url):
    cache = RedisResultCache(redis_url, ttl_s=60, prefix="test-cache:")
    assert cache.get("k") is None
    cache.put("k", result("hello"))
    assert cache.get("k").text == "hello"
