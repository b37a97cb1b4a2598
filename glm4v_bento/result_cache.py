"""Result cache for deterministic requests: the same inputs give the same answer, so keep it.

Only requests whose output is determined by their inputs are cached: greedy ones, or sampled
ones with a fixed seed. The key is a SHA-256 over the image bytes, the texts, every sampling
parameter and the model (id and revision). Entries live in an in-process LRU bounded in bytes,
or in Redis (GLM4V_REDIS_URL) with a time to live. A request can opt out.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from glm4v_bento.engine import GenerationResult, SamplingParams
from glm4v_bento.redis_guard import RedisGuard


def is_deterministic(params: SamplingParams) -> bool:
    return params.greedy or params.seed is not None


def cache_key(
    *,
    model: str,
    revision: str | None,
    images: list[bytes],
    prompt: str,
    system: str | None,
    history: list[tuple[str, str, list[bytes]]],
    params: SamplingParams,
) -> str:
    digest = hashlib.sha256()
    canonical = {
        "model": model,
        "revision": revision,
        "system": system,
        "history": [[role, text, [hashlib.sha256(i).hexdigest() for i in imgs]] for role, text, imgs in history],
        "prompt": prompt,
        "images": [hashlib.sha256(i).hexdigest() for i in images],
        "params": params.model_dump(mode="json"),
    }
    digest.update(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


class ResultCache(Protocol):
    def get(self, key: str) -> GenerationResult | None: ...

    def put(self, key: str, result: GenerationResult) -> None: ...


class MemoryResultCache:
    """Least-recently-used entries, evicted when their total size passes ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> GenerationResult | None:
        with self._lock:
            blob = self._entries.get(key)
            if blob is None:
                return None
            self._entries.move_to_end(key)
        return GenerationResult.model_validate_json(blob)

    def put(self, key: str, result: GenerationResult) -> None:
        blob = result.model_dump_json().encode()
        if len(blob) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self._size -= len(old) if old else 0
            self._entries[key] = blob
            self._size += len(blob)
            while self._size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted)

    def __len__(self) -> int:
        return len(self._entries)


class RedisResultCache:
    """Shared by every replica using the same Redis; entries expire after ``ttl_s``. While Redis
    cannot be reached, every lookup misses and nothing is stored (see redis_guard)."""

    def __init__(
        self, url: str, ttl_s: int, prefix: str = "glm4v:cache:", on_failure: Callable[[], None] | None = None
    ) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._ttl = ttl_s
        self._prefix = prefix
        self._guard = RedisGuard("result cache", "Every request is generated, none is cached", on_failure)

    def get(self, key: str) -> GenerationResult | None:
        blob = self._guard.call(lambda: self._redis.get(self._prefix + key), None)
        return GenerationResult.model_validate_json(blob) if blob else None

    def put(self, key: str, result: GenerationResult) -> None:
        self._guard.call(lambda: self._redis.set(self._prefix + key, result.model_dump_json(), ex=self._ttl), None)
