"""Log-probabilities of the generated tokens: the model's own (checked against transformers'
logits), for the rows that ask, in results and in streams alike."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import make_image
from test_decode_reference import STEPS, Reference

from glm4v_bento.engine import Finished, GenerationRequest, SamplingParams


def asking(logprobs: int | None, **params) -> GenerationRequest:
    params = {"max_new_tokens": STEPS, "ignore_eos": True, "temperature": 0.0, **params}
    return GenerationRequest(
        "Describe this image.", images=[make_image(64, 48)], params=SamplingParams(**params), logprobs=logprobs
    )


def test_each_tokens_logprob_and_alternatives_are_the_models(engine, loaded_model):
    request = asking(3)
    [result] = engine.generate([request])
    reference = Reference(loaded_model, engine.prompts.build(request))
    assert [entry.token_id for entry in result.logprobs] == reference.tokens
    for step, entry in enumerate(result.logprobs):
        expected = torch.log_softmax(reference.logits[step].float(), dim=-1)
        assert entry.logprob == pytest.approx(expected[entry.token_id].item(), abs=1e-4)
        best = expected.topk(3)
        assert [alt.token_id for alt in entry.top_logprobs] == best.indices.tolist()
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.token == loaded_model.tokenizer.decode([entry.token_id])
    assert result.logprobs[0].top_logprobs[0].token_id == result.logprobs[0].token_id  # greedy took the best


def test_the_tokens_bytes_join_into_the_generated_text(engine, loaded_model):
    """Sampled widely, the tiny model's tokens include pieces of characters (U+FFFD alone)."""
    [result] = engine.generate([asking(0, temperature=1.5, seed=7, max_new_tokens=64)])
    tokens = [entry.token_id for entry in result.logprobs]
    assert any(entry.token == "\ufffd" for entry in result.logprobs)  # what this is about
    joined = bytes(byte for entry in result.logprobs for byte in entry.bytes)
    assert joined.decode(errors="replace") == loaded_model.tokenizer.decode(tokens)


def test_only_the_rows_that_ask_get_them(engine):
    sampled = asking(0, temperature=1.5, seed=3)  # sampled: logprobs of the model, not of the sampling
    none, zero, five = engine.generate([asking(None), sampled, asking(5)])
    assert none.logprobs is None
    assert len(zero.logprobs) == zero.usage.completion_tokens and all(not e.top_logprobs for e in zero.logprobs)
    assert all(len(entry.top_logprobs) == 5 for entry in five.logprobs)
    for entry in zero.logprobs:
        assert entry.logprob <= 0.0


def test_a_request_for_too_many_alternatives_fails_alone(engine):
    bad, good = engine.generate([asking(21), asking(None)])
    assert bad.finish_reason == "error" and bad.error_type == "invalid_request" and "0 to 20" in bad.error
    assert good.finish_reason == "length"


def test_a_stream_carries_every_tokens_logprobs_once_and_in_order(engine):
    async def stream():
        handle = engine.submit(asking(2, stop=["zzzz"]), stream=True)  # a stop string holds text back
        return [event async for event in handle.events()]

    events = asyncio.run(stream())
    result = events[-1].result
    assert isinstance(events[-1], Finished)
    streamed = [entry for event in events[:-1] for entry in event.logprobs]
    assert streamed == result.logprobs and len(streamed) == result.usage.completion_tokens
