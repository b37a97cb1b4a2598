"""Shared by the benchmarks of a request arriving while streams run: how long the streams pause."""

from __future__ import annotations

import time
from collections.abc import Callable

from glm4v_bento.engine import Engine, GenerationRequest, GenerationResult, SamplingParams


def pause_while_arriving(
    engine: Engine, streams: int, arrive: Callable[[], GenerationResult]
) -> tuple[float, GenerationResult]:
    """Start ``streams`` rows decoding (ignore_eos), let a few plain steps run, then call
    ``arrive`` (it submits the arriving request and waits for its result). The running rows get a
    token per scheduler step, so the longest gap between two steps after the arrival is the
    longest pause their streams see -> (that pause in ms, the arriving request's result)."""
    steps: list[float] = []
    engine.scheduler.on_step = lambda running, waiting: steps.append(time.perf_counter())
    params = SamplingParams(max_new_tokens=4000, ignore_eos=True, temperature=0.0)
    running = [engine.submit(GenerationRequest(f"stream {i}", params=params)) for i in range(streams)]
    deadline = time.monotonic() + 60
    _wait_until(lambda: engine.running >= streams, deadline, "the streams did not start")
    # A few plain decode steps first: counted, not timed, as a busy machine may take longer for them.
    plain = len(steps) + 3
    _wait_until(lambda: len(steps) >= plain, deadline, "the streams did not decode")
    arrived = time.perf_counter()
    result = arrive()
    answered = time.perf_counter()
    while not steps or steps[-1] <= answered:  # the step that delivered it ends a moment later
        time.sleep(0.001)
    for handle in running:
        handle.cancel()
    for handle in running:
        handle.result(timeout=60)
    engine.scheduler.on_step = None
    during = [t for t in steps if t >= arrived]
    before = [t for t in steps if t < arrived]
    gaps = [b - a for a, b in zip([before[-1], *during], during, strict=False)]
    return max(gaps) * 1000, result


def _wait_until(condition: Callable[[], bool], deadline: float, failure: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.001)


def ttft_ms(result: GenerationResult) -> float:
    """A request's own time to its first token: its queue + prefill time."""
    return (result.timings.queue_s + result.timings.prefill_s) * 1000
