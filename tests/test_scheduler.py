"""Continuous batching: admission between steps, early exits, cancellation, bounds, streaming."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from conftest import make_image

from glm4v_bento.engine import (
    Engine,
    Finished,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    SchedulerLimits,
    TextDelta,
)


def request(prompt: str, tokens: int, image_size: int | None = None, **params) -> GenerationRequest:
    images = [make_image(image_size, image_size)] if image_size else []
    return GenerationRequest(
        prompt, images=images, params=SamplingParams(max_new_tokens=tokens, ignore_eos=True, **params)
    )


@pytest.fixture
def make_engine(loaded_model):
    engines = []

    def make(**limits) -> Engine:
        engine = Engine(loaded_model, default_max_new_tokens=32, limits=SchedulerLimits(**limits))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_short_request_admitted_while_a_long_one_runs_finishes_first(make_engine):
    engine = make_engine()
    long = engine.submit(request("long story", 1500))
    wait_until(lambda: engine.running == 1)
    short = engine.submit(request("quick question", 10, image_size=56))
    short_result = short.result(timeout=60)
    assert not long.done, "the short request had to wait for the long one"
    assert short_result.usage.completion_tokens == 10
    assert long.result(timeout=120).usage.completion_tokens == 1500


def test_static_policy_makes_the_short_request_wait(make_engine):
    engine = make_engine(policy="static")
    long = engine.submit(request("long story", 300))
    wait_until(lambda: engine.running == 1)
    short = engine.submit(request("quick question", 10))
    short_result = short.result(timeout=60)
    assert long.done  # admitted only once the batch had emptied
    assert short_result.timings.queue_s > 0


def test_greedy_output_is_the_same_under_continuous_admission(make_engine, engine):
    requests = [request(f"q{i}", 40 + 7 * i, image_size=28 + 14 * i) for i in range(5)]
    solo = [engine.generate([r])[0].text for r in requests]
    staggered = make_engine()
    handles = []
    for r in requests:  # each joins a batch that is already running
        handles.append(staggered.submit(r))
        wait_until(lambda: staggered.running >= 1 or all(h.done for h in handles))
        time.sleep(0.01)
    assert [h.result(timeout=60).text for h in handles] == solo


def test_cancelling_a_running_request_frees_its_slot(make_engine):
    engine = make_engine(max_running=1)
    first = engine.submit(request("occupy the only slot", 6000))
    wait_until(lambda: engine.running == 1)
    second = engine.submit(request("waits for the slot", 5))
    time.sleep(0.05)
    assert engine.queue_depth == 1 and not second.done
    first.cancel()
    assert second.result(timeout=30).usage.completion_tokens == 5
    cancelled = first.result(timeout=30)
    assert cancelled.finish_reason == "cancelled"
    assert 0 < cancelled.usage.completion_tokens < 6000


def test_cancel_by_request_id_and_while_waiting(make_engine):
    engine = make_engine(max_running=1)
    blocker = engine.submit(request("blocker", 4000))
    wait_until(lambda: engine.running == 1)
    queued = engine.submit(GenerationRequest("queued", params=SamplingParams(max_new_tokens=5), request_id="r-42"))
    assert engine.cancel("r-42") is True
    assert queued.result(timeout=30).finish_reason == "cancelled"
    assert engine.cancel("r-42") is False  # forgotten once finished
    blocker.cancel()
    assert blocker.result(timeout=30).finish_reason == "cancelled"


def test_a_full_queue_refuses_at_once(make_engine):
    engine = make_engine(max_running=1, max_waiting=2)
    blocker = engine.submit(request("blocker", 4000))
    wait_until(lambda: engine.running == 1)
    engine.submit(request("a", 2))
    engine.submit(request("b", 2))
    started = time.monotonic()
    with pytest.raises(QueueFullError, match="retry"):
        engine.submit(request("c", 2))
    assert time.monotonic() - started < 1.0
    blocker.cancel()


def test_token_budget_holds_back_requests_that_do_not_fit(make_engine):
    engine = make_engine(max_batch_tokens=700)
    first = engine.submit(request("first", 600))
    wait_until(lambda: engine.running == 1)
    second = engine.submit(request("second", 600))
    time.sleep(0.05)
    assert engine.running == 1 and engine.queue_depth == 1
    assert first.result(timeout=60).finish_reason == "length"
    assert second.result(timeout=60).finish_reason == "length"
    assert second.result().timings.queue_s > 0


def test_stream_events_arrive_in_order_and_add_up_to_the_result(make_engine):
    engine = make_engine()

    async def consume():
        handle = engine.submit(request("tell me", 60, image_size=56, stop=["zzz-never"]), stream=True)
        events = [event async for event in handle.events()]
        return events

    events = asyncio.run(consume())
    assert isinstance(events[-1], Finished)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    assert len(events) > 10  # really streamed, not one lump at the end
    assert "".join(e.text for e in events[:-1]) == events[-1].result.text


def test_stream_holds_back_a_stop_string(make_engine, engine):
    full = engine.generate([request("tell me", 40)])[0].text
    stop = full[10:13]
    cut = full[: full.find(stop)]
    streamer = make_engine()

    async def consume():
        handle = streamer.submit(request("tell me", 40, stop=[stop]), stream=True)
        return [event async for event in handle.events()]

    events = asyncio.run(consume())
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert streamed == cut == events[-1].result.text
    assert events[-1].result.finish_reason == "stop"


def test_leaving_a_stream_early_cancels_the_request(make_engine):
    engine = make_engine()

    async def consume_a_little():
        handle = engine.submit(request("long", 5000), stream=True)
        async for event in handle.events():
            if isinstance(event, TextDelta):
                break  # the client went away
        return handle

    handle = asyncio.run(consume_a_little())
    assert handle.result(timeout=30).finish_reason == "cancelled"
    wait_until(lambda: engine.running == 0)


def test_a_cache_that_cannot_compact_fails_its_rows_and_the_engine_goes_on(make_engine, monkeypatch):
    """Compaction runs on the device and can fail (out of GPU memory): the rows still running
    end with an error, the ones that had finished keep their answer, and later requests run."""
    engine = make_engine()
    real_keep = engine.runner.keep
    calls = []

    def failing_once(rows):
        calls.append(rows)
        if len(calls) == 1 and rows:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_keep(rows)

    monkeypatch.setattr(engine.runner, "keep", failing_once)
    short, long = engine.generate([request("short", 3), request("long", 30)])
    assert short.finish_reason == "length" and short.error is None
    assert long.finish_reason == "error" and long.error_type == "internal"
    [later] = engine.generate([request("later", 5)])
    assert later.finish_reason == "length" and later.usage.completion_tokens == 5


class RunnerCalls:
    """The order in which the scheduler calls the runner's prefill chunks and decode steps
    (each call still runs)."""

    def __init__(self, runner, monkeypatch) -> None:
        self.names: list[str] = []
        for name in ("prefill_step", "decode"):
            real = getattr(runner, name)

            def record(*args, _real=real, _name=name):
                self.names.append(_name)
                return _real(*args)

            monkeypatch.setattr(runner, name, record)

    def count(self, name: str) -> int:
        return self.names.count(name)


@pytest.fixture
def chunked_engine(loaded_model):
    engines = []

    def make(chunk: int) -> Engine:
        engines.append(Engine(loaded_model, default_max_new_tokens=32, prefill_chunk_tokens=chunk))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def test_a_long_prompt_is_prefilled_between_the_running_rows_decode_steps(chunked_engine, engine, monkeypatch):
    chunked = chunked_engine(16)
    calls = RunnerCalls(chunked.runner, monkeypatch)
    running = chunked.submit(request("a stream that runs meanwhile", 3000))
    wait_until(lambda: chunked.running == 1)
    long = request("word " * 200, 6)
    result = chunked.submit(long).result(timeout=60)
    running.cancel()

    chunks = -(-result.usage.prompt_tokens // 16)
    assert chunks >= 10
    last_chunks = [i for i, name in enumerate(calls.names) if name == "prefill_step"][-chunks:]
    # One decode step of the running row after every chunk: it never paused for the whole prompt.
    for first, second in itertools.pairwise(last_chunks):
        assert calls.names[first + 1 : second] == ["decode"]
    # And the chunked prompt's answer is the one it gets prefilled whole.
    [whole] = engine.generate([long])
    assert result.text == whole.text and result.usage == whole.usage


def test_a_request_cancelled_during_its_prefill_stops_there(chunked_engine, monkeypatch):
    chunked = chunked_engine(1)
    calls = RunnerCalls(chunked.runner, monkeypatch)
    running = chunked.submit(request("a stream that runs meanwhile", 5000))
    wait_until(lambda: chunked.running == 1)
    before = calls.count("prefill_step")
    handle = chunked.submit(request("word " * 200, 4))
    wait_until(lambda: calls.count("prefill_step") >= before + 3)
    handle.cancel()
    result = handle.result(timeout=30)
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens == 0
    assert calls.count("prefill_step") - before < 200  # the rest of its 200+ chunks never ran
    assert not running.done  # the running row goes on
    running.cancel()


def test_shutting_down_during_a_prefill_ends_that_request_too(chunked_engine, monkeypatch):
    chunked = chunked_engine(1)
    calls = RunnerCalls(chunked.runner, monkeypatch)
    handle = chunked.submit(request("word " * 200, 4))
    wait_until(lambda: calls.count("prefill_step") >= 3)
    chunked.close()
    result = handle.result(timeout=30)
    assert result.finish_reason == "cancelled" and "shut down" in result.error


def test_prompts_are_prefilled_whole_on_the_cpu_unless_chunks_are_asked_for(engine, tiny_model_dir):
    from glm4v_bento.config import Settings

    assert engine.runner.prefill_chunk_tokens == 0  # auto: chunks only on a GPU
    chunked = Engine.from_settings(Settings(model=str(tiny_model_dir), device="cpu", prefill_chunk_tokens=64))
    try:
        assert chunked.runner.prefill_chunk_tokens == 64
    finally:
        chunked.close()


def test_a_prompt_that_breaks_the_model_mid_prefill_fails_alone(chunked_engine, loaded_model, monkeypatch):
    """A failure in a later chunk of a group's prefill costs only the request that causes it."""
    chunked = chunked_engine(4)
    poison = loaded_model.tokenizer.encode("POISON", add_special_tokens=False)
    marker = loaded_model.model.get_input_embeddings().weight[poison[0]]
    real_forward = loaded_model.model.forward
    chunks_run = []

    def fragile_forward(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            chunks_run.append(embeds.shape[1])
            if bool((embeds == marker).all(-1).any()):
                raise RuntimeError("simulated kernel failure")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded_model.model, "forward", fragile_forward)
    good, bad = request("fine", 5), request("a longer prompt that ends in POISON", 5)
    results = chunked.generate([good, bad, good])
    assert [r.finish_reason for r in results] == ["length", "error", "length"]
    assert results[1].error_type == "internal"
    assert len(chunks_run) > 3 and max(chunks_run) == 4  # it failed in one of several chunks


def test_merged_streams_keep_each_ones_order_and_closing_them_cancels_all(make_engine):
    from contextlib import aclosing

    from glm4v_bento.engine import merged_events

    engine = make_engine()

    async def run() -> tuple[dict[int, str], list]:
        handles = [engine.submit(request(f"q{i}", 6 + i), stream=True) for i in range(3)]
        texts: dict[int, str] = {0: "", 1: "", 2: ""}
        results = {}
        async for index, event in merged_events(handles):
            if isinstance(event, Finished):
                results[index] = event.result
            else:
                texts[index] += event.text
        assert sorted(results) == [0, 1, 2]
        assert all(texts[i] == results[i].text for i in range(3))  # each stream whole and in order

        long = [engine.submit(request(f"long {i}", 5000), stream=True) for i in range(2)]
        async with aclosing(merged_events(long)) as events:
            async for _ in events:
                break  # the caller leaves after one event
        return [handle.result(timeout=30).finish_reason for handle in long]

    assert asyncio.run(run()) == ["cancelled", "cancelled"]


class Abandoned:
    """An ``on_abandoned`` callback that keeps what it is told."""

    def __init__(self) -> None:
        self.results: list = []

    def __call__(self, result) -> None:
        self.results.append(result)


def test_a_stream_left_early_hands_what_ran_to_its_abandoned_callbacks(make_engine):
    engine = make_engine()
    told = Abandoned()

    async def leave_after_some_text() -> int:
        handle = engine.submit(request("long", 5000), stream=True)
        handle.on_abandoned(told)
        seen = 0
        async for _ in handle.events():
            seen += 1
            if seen == 5:
                break  # the client went away
        return seen

    seen = asyncio.run(leave_after_some_text())
    wait_until(lambda: len(told.results) == 1)
    [result] = told.results
    assert result.finish_reason == "cancelled" and seen <= result.usage.completion_tokens < 5000
    time.sleep(0.1)
    assert len(told.results) == 1  # once


def test_a_wait_that_is_cancelled_abandons_and_one_that_returned_never_does(make_engine):
    engine = make_engine()
    left, stayed = Abandoned(), Abandoned()

    async def run():
        long = engine.submit(request("long", 5000))
        long.on_abandoned(left)
        waiting = asyncio.ensure_future(long.wait())
        await asyncio.sleep(0.2)
        waiting.cancel()  # the handler was cancelled: its client left
        short = engine.submit(request("short", 3))
        short.on_abandoned(stayed)
        result = await short.wait()
        short.cancel()  # too late to matter: the caller has the result
        return result

    assert asyncio.run(run()).finish_reason == "length"
    wait_until(lambda: len(left.results) == 1)
    assert left.results[0].finish_reason == "cancelled" and left.results[0].usage.completion_tokens > 0
    assert stayed.results == []


def test_closing_merged_streams_abandons_only_the_results_not_passed_on(make_engine):
    from contextlib import aclosing

    from glm4v_bento.engine import merged_events

    engine = make_engine()
    told = [Abandoned() for _ in range(3)]

    async def run() -> int:
        # Two short ones end in the same step: one result reaches the caller, the other may
        # already be on its way through the merge when the caller leaves.
        handles = [engine.submit(request(f"short {i}", 2), stream=True) for i in range(2)]
        handles.append(engine.submit(request("long", 5000), stream=True))
        for handle, callback in zip(handles, told, strict=True):
            handle.on_abandoned(callback)
        async with aclosing(merged_events(handles)) as events:
            async for index, event in events:
                if isinstance(event, Finished):
                    return index  # the caller leaves with the first result

    had = asyncio.run(run())
    other = 1 - had
    wait_until(lambda: len(told[other].results) == len(told[2].results) == 1)
    assert told[had].results == []  # the caller had it
    assert told[other].results[0].finish_reason == "length" and told[2].results[0].finish_reason == "cancelled"


def test_a_failing_abandoned_callback_is_logged_and_the_engine_goes_on(make_engine, caplog):
    engine = make_engine()

    def broken(result) -> None:
        raise RuntimeError("metrics backend down")

    async def leave() -> None:
        handle = engine.submit(request("long", 5000), stream=True)
        handle.on_abandoned(broken)
        async for _ in handle.events():
            break

    asyncio.run(leave())
    assert engine.submit(request("next", 3)).result(timeout=30).finish_reason == "length"
    assert "a callback for an abandoned request failed" in caplog.text
