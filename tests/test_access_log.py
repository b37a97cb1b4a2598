"""The access-log middleware alone, around small ASGI apps: what a request's line says when its
client leaves while its generation is still running (the end-to-end checks are in
test_hardening_e2e.py)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading

import pytest
from asgi_once import call_once

from glm4v_bento import access_log
from glm4v_bento.engine import GenerationResult, Timings, Usage


def cancelled_after(tokens: int, request_id: str) -> GenerationResult:
    """What the scheduler reports for a generation stopped because its client left."""
    return GenerationResult(
        request_id=request_id,
        text="x" * tokens,
        thinking="",
        answer="",
        finish_reason="cancelled",
        usage=Usage(prompt_tokens=7, completion_tokens=tokens, total_tokens=7 + tokens),
        timings=Timings(queue_s=0.0, prefill_s=0.01, decode_s=0.2, total_s=0.21),
    )


@pytest.fixture
def lines():
    """The access lines written while the test runs, as the fields each carries."""
    written: list[dict] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(dict(record.__dict__))

    keep = Keep()
    logger = logging.getLogger("glm4v.access")
    level = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    yield written
    logger.removeHandler(keep)
    logger.setLevel(level)


def cut_stream(result_after_s: float | None, *, finish: bool = False):
    """An app that starts a generation, streams one piece and returns without the last (its client
    left), unless ``finish``. The generation's result comes ``result_after_s`` later from another
    thread, as the scheduler's does (None: never)."""

    async def app(scope, receive, send) -> None:
        access_log.expect_result("gen-1")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"req-1")]})
        await send({"type": "http.response.body", "body": b"a piece", "more_body": not finish})
        if result_after_s is not None:
            origin = contextvars.copy_context()  # the request's: where the host reports it
            report = threading.Timer(result_after_s, origin.run, (access_log.note_result, cancelled_after(30, "gen-1")))
            report.start()

    return app


async def serve_once(app) -> None:
    await call_once(access_log.JsonAccessLog(app), "/v1/chat/completions")


def test_a_client_that_left_gets_a_line_with_the_tokens_its_generation_had(lines):
    asyncio.run(serve_once(cut_stream(result_after_s=0.3)))

    [line] = lines
    assert line["client_left"] is True and line["status"] == 200 and line["request_id"] == "req-1"
    assert line["completion_tokens"] == 30 and line["prompt_tokens"] == 7
    assert line["finish_reason"] == "cancelled"
    assert line["duration_s"] < 0.3  # the client's time, not the wait for its generation's end


def test_a_result_that_never_comes_holds_the_line_back_only_so_long(lines, monkeypatch):
    monkeypatch.setattr(access_log, "ABANDONED_WAIT_S", 0.2)
    asyncio.run(serve_once(cut_stream(result_after_s=None)))

    [line] = lines
    assert line["client_left"] is True and "completion_tokens" not in line


def test_an_answer_sent_whole_is_logged_without_waiting_for_anything(lines, monkeypatch):
    monkeypatch.setattr(access_log, "ABANDONED_WAIT_S", 60)  # serve_once gives up after 10 s
    asyncio.run(serve_once(cut_stream(result_after_s=None, finish=True)))

    [line] = lines
    assert "client_left" not in line and line["status"] == 200


def test_a_server_stopping_while_a_line_waits_still_writes_it(lines, monkeypatch):
    monkeypatch.setattr(access_log, "ABANDONED_WAIT_S", 60)

    async def stopped_while_waiting() -> None:
        serving = asyncio.create_task(serve_once(cut_stream(result_after_s=None)))
        await asyncio.sleep(0.2)  # the app has returned; its line waits for the generation
        assert not lines
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving

    asyncio.run(stopped_while_waiting())
    [line] = lines
    assert line["client_left"] is True and line["status"] == 200
