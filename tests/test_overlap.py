"""Decode steps overlapped with the host's work on the step before (glm4v_bento/engine/overlap.py):
each answer is the one it gets without the overlap, whatever stops it and whoever joins or leaves."""

from __future__ import annotations

import asyncio

import pytest
import torch

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, SchedulerLimits
from glm4v_bento.engine import scheduler as scheduler_module
from glm4v_bento.engine.handle import Finished
from glm4v_bento.engine.overlap import PendingTokens


class Row:
    def __init__(self, last: int) -> None:
        self.output_ids = [last]


def test_the_next_input_follows_rows_that_left_and_joined():
    a, b, c, d = Row(1), Row(2), Row(3), Row(4)
    pending = PendingTokens([(a, None), (b, None), (c, None)], torch.tensor([10, 20, 30]), staging=None)
    assert pending.feed([(a, None), (b, None), (c, None)]).tolist() == [10, 20, 30]
    assert pending.feed([(a, None), (c, None), (d, None)]).tolist() == [10, 30, 4]  # b left, d joined
    assert pending.feed([(d, None)]).tolist() == [4]
    assert pending.feed([(c, None), (a, None)]).tolist() == [30, 10]
    assert pending.feed([(d, None), (a, None)]) == [4, 10]  # a new row first, never made: read back
    assert pending.wait() == [10, 20, 30]


def requests() -> list[GenerationRequest]:
    """Every way a row can end or be sampled: length, EOS, a stop string, seeded sampling,
    penalties, log-probabilities (which take the path without overlap for their steps)."""
    words = ["the", "cat", "sat", "on", "a", "red", "mat", "and", "two", "dogs", "ran", "past", "an", "old", "house"]
    made = []
    for i in range(12):
        prompt = " ".join(words[: 3 + i])
        params = {"max_new_tokens": 4 + (i * 7) % 29, "temperature": 0.0}
        if i % 4 == 1:
            params |= {"temperature": 0.9, "top_p": 0.9, "seed": i}
        if i % 4 == 2:
            params |= {"repetition_penalty": 1.3, "presence_penalty": 0.5}
        if i % 3 == 0:
            params["ignore_eos"] = True
        if i == 5:
            params["stop"] = ["e"]
        logprobs = 2 if i == 7 else None
        made.append(GenerationRequest(prompt, params=SamplingParams(**params), logprobs=logprobs, request_id=str(i)))
    return made


def outcome(result):
    logprobs = [(entry.token_id, round(entry.logprob, 4)) for entry in result.logprobs or []]
    return result.finish_reason, result.text, result.usage, logprobs


@pytest.mark.parametrize("max_running", [1, 4])
def test_overlapped_steps_give_every_request_its_own_answer(loaded_model, engine, monkeypatch, max_running):
    alone = [outcome(engine.generate([request])[0]) for request in requests()]
    made = []

    class Counted(PendingTokens):
        def __init__(self, *args, **kwargs) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "PendingTokens", Counted)
    overlapped = Engine(loaded_model, limits=SchedulerLimits(max_running=max_running), overlap_steps=True)
    fed = []
    decode = overlapped.runner.decode
    overlapped.runner.decode = lambda tokens: fed.append(isinstance(tokens, torch.Tensor)) or decode(tokens)
    try:
        results = [outcome(result) for result in overlapped.generate(requests())]
        events = asyncio.run(stream(overlapped, requests()[5]))
    finally:
        overlapped.close()
    assert results == alone
    # The stream's pieces add up to the answer, the stop string held back.
    assert isinstance(events[-1], Finished) and "".join(e.text for e in events[:-1]) == alone[5][1]
    assert {reason for reason, *_ in alone} >= {"length", "stop"}
    assert made and sum(fed) > len(fed) / 2  # most steps were fed from device memory


async def stream(engine: Engine, request: GenerationRequest) -> list:
    return [event async for event in engine.submit(request, stream=True).events()]


def test_cancelling_during_overlapped_steps_ends_the_row_and_the_rest_go_on(loaded_model, engine):
    long = GenerationRequest("go on", params=SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True))
    short = GenerationRequest("and you", params=SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))
    expected = engine.generate([short])[0].text
    overlapped = Engine(loaded_model, limits=SchedulerLimits(max_running=4), overlap_steps=True)
    try:
        handle = overlapped.submit(long)
        first = overlapped.submit(short)
        handle.cancel()
        assert handle.result(timeout=60).finish_reason == "cancelled"
        assert first.result(timeout=60).text == expected
        assert overlapped.generate([short])[0].text == expected  # and the engine is still sound
    finally:
        overlapped.close()


def test_steps_are_waited_for_on_a_cpu_unless_the_setting_asks_for_overlap(engine, tiny_model_dir):
    """Unset, overlap follows the model's place (one GPU: on; test_cuda_paths checks that side).
    On a CPU nothing runs behind the host, so it is off unless GLM4V_OVERLAP_STEPS says so."""
    from glm4v_bento.config import Settings

    assert engine.scheduler.overlap_steps is False
    overlapped = Engine.from_settings(Settings(model=str(tiny_model_dir), device="cpu", overlap_steps=True))
    try:
        assert overlapped.scheduler.overlap_steps is True
    finally:
        overlapped.close()
