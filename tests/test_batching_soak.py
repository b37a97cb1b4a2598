"""A random mix of arrivals, prompt lengths, images, answer lengths and cancellations through
one engine with every batching path on at once: prefill in chunks between decode steps, rows
joining and leaving (compaction), the cache growing, decode steps replayed per bucket. Each
greedy answer must still be the answer the request gets alone."""

from __future__ import annotations

import random
import threading
import time
import weakref

import pytest
from conftest import make_image

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, SchedulerLimits
from glm4v_bento.engine.kv_cache import StaticKVCache

WORDS = ["the", "cat", "sat", "on", "a", "red", "mat", "two", "dogs", "ran", "past", "old", "blue", "house"]


def buffer_addresses(cache: StaticKVCache) -> list[int]:
    """Where every tensor a decode step reads lives (what a CUDA graph has baked in)."""
    tensors = [*cache.keys, *cache.values, cache.mask, cache.positions, cache.tokens]
    return [t.data_ptr() for t in [*tensors, *cache._write_columns, *cache._row_indices]]


def strict_replay(cache: StaticKVCache):
    """A CPU stand-in for CUDA-graph capture that also fails where a real graph would go wrong:
    replaying after any buffer it read has moved (silently wrong tokens on a GPU), and capturing
    into a memory pool whose graphs were all dropped (PyTorch's allocator asserts)."""
    live: dict[int, weakref.WeakSet] = {}  # pool -> its graphs still held

    def capture(step, pool):
        if pool in live and not live[pool]:
            raise RuntimeError(f"capture into memory pool {pool}, whose graphs were all freed")
        logits = step()
        recorded = buffer_addresses(cache)

        def replay() -> None:
            assert buffer_addresses(cache) == recorded, "a captured decode step would read moved buffers"
            logits.copy_(step())

        live.setdefault(pool, weakref.WeakSet()).add(replay)
        return replay, logits

    return capture


def random_requests(rng: random.Random, count: int) -> list[GenerationRequest]:
    requests = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        side = rng.choice([28, 56, 84])
        images = [make_image(side, side, (i * 40 % 256, 90, 160))] if rng.random() < 0.4 else []
        params = SamplingParams(max_new_tokens=rng.randint(1, 48), temperature=0.0, ignore_eos=True)
        requests.append(GenerationRequest(prompt, images=images, params=params, request_id=f"soak-{i}"))
    return requests


@pytest.mark.parametrize(
    ("seed", "compiled", "overlap"), [(1, False, False), (2, False, False), (3, True, False), (4, False, True)]
)
def test_greedy_answers_survive_a_random_mix_of_arrivals_and_cancellations(
    loaded_model, engine, seed, compiled, overlap
):
    """``compiled``: the decode step also goes through torch.compile, as served on a GPU.
    ``overlap``: each step is launched before the tokens of the one before are read back."""
    rng = random.Random(seed)
    requests = random_requests(rng, 18)
    alone = [engine.generate([request])[0] for request in requests]

    limits = SchedulerLimits(max_running=4)
    soak = Engine(
        loaded_model,
        limits=limits,
        prefill_chunk_tokens=7,
        cuda_graphs=False,
        compile_decode=compiled,
        overlap_steps=overlap,
    )
    graphs = soak.runner.use_graphs(strict_replay(soak.runner.cache))
    timers = []
    try:
        handles = []
        cancelled = set(rng.sample(range(len(requests)), 5))
        for index, request in enumerate(requests):
            handles.append(soak.submit(request))
            if index in cancelled:
                timers.append(threading.Timer(rng.uniform(0.0, 0.05), handles[-1].cancel))
                timers[-1].start()
            time.sleep(rng.uniform(0.0, 0.02))
        results = [handle.result(timeout=120) for handle in handles]
        # The engine is still sound afterwards: a last request gets its solo answer too.
        assert soak.generate([requests[0]])[0].text == alone[0].text
    finally:
        for timer in timers:
            timer.cancel()
        soak.close()

    for index, (result, solo) in enumerate(zip(results, alone, strict=True)):
        if result.finish_reason == "cancelled":
            assert index in cancelled
            assert solo.text.startswith(result.text), f"request {index}: a cancelled answer is a prefix of its own"
        else:
            assert (result.finish_reason, result.text, result.usage) == ("length", solo.text, solo.usage), index
    assert graphs.enabled and graphs.captured >= 2  # no replay disagreed; several buckets were used
    if compiled:  # it ran compiled, not quietly eager after a failed check
        assert soak.runner.compiled.enabled and soak.runner.compiled.checked
    assert soak.runner.cache.generation >= 2  # the buffers grew at least once under the graphs
