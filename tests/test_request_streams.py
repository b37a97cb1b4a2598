"""Streams opened for a request end with it (request_streams.py), on the tiny model's engine:
a generation whose stream nobody began to read must not run to its last token for nobody."""

from __future__ import annotations

import asyncio
import contextvars

from asgi_once import call_once

from glm4v_bento import request_streams
from glm4v_bento.engine import Finished, GenerationRequest, GenerationResult, SamplingParams

LONG = SamplingParams(max_new_tokens=2000, temperature=0.0, ignore_eos=True)


def open_stream(engine, abandoned: list[GenerationResult]):
    """What the service does for a streamed request: submit it, and hand it to the request."""
    handle = engine.submit(GenerationRequest("tell me a long story", params=LONG, request_id="s-1"), stream=True)
    handle.on_abandoned(abandoned.append)
    request_streams.own(handle)
    return handle


async def serve_once(app) -> None:
    await call_once(request_streams.StreamsEndWithTheirRequest(app), "/v1/vision/stream", timeout_s=30)


def test_a_stream_nobody_began_to_read_is_stopped_and_accounted_when_its_request_ends(engine):
    abandoned: list[GenerationResult] = []
    opened = []

    async def response_never_sent(scope, receive, send) -> None:
        opened.append(open_stream(engine, abandoned))  # then the request ends before its body runs

    asyncio.run(serve_once(response_never_sent))

    result = opened[0].result(timeout=30)
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens < LONG.max_new_tokens
    assert abandoned == [result]  # its tokens are charged and counted like a client's who left


def test_a_stream_read_to_its_end_is_left_alone(engine):
    abandoned: list[GenerationResult] = []
    short = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)

    async def streamed(scope, receive, send) -> None:
        handle = engine.submit(GenerationRequest("hello", params=short, request_id="s-2"), stream=True)
        handle.on_abandoned(abandoned.append)
        request_streams.own(handle)
        events = [event async for event in handle.events()]
        assert isinstance(events[-1], Finished)

    asyncio.run(serve_once(streamed))
    assert not abandoned


def test_a_stream_opened_after_its_request_ended_is_stopped_at_once(engine):
    abandoned: list[GenerationResult] = []
    late = []

    async def handler_gone_before_its_submission_returned(scope, receive, send) -> None:
        late.append(contextvars.copy_context())  # as anyio hands it to the submitting thread

    asyncio.run(serve_once(handler_gone_before_its_submission_returned))
    late[0].run(lambda: late.append(open_stream(engine, abandoned)))  # its worker thread, afterwards

    result = late[1].result(timeout=30)
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens < LONG.max_new_tokens
    assert abandoned == [result]
