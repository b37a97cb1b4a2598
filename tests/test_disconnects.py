"""A client that goes away stops its request's work: the middleware alone, then the real server."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from conftest import encode, make_image, metric

from glm4v_bento.disconnects import CLIENT_LEFT, CancelOnDisconnect
from glm4v_bento.http_limits import INTERNAL_HEADER, INTERNAL_TOKEN


class Connection:
    """The server side of one connection: the body, then a disconnect when the client leaves."""

    def __init__(self, leaves_after_s: float | None) -> None:
        self.messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
        self.leaves_after_s = leaves_after_s
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        if self.messages:
            return self.messages.pop(0)
        if self.leaves_after_s is None:
            await asyncio.Event().wait()  # never leaves
        await asyncio.sleep(self.leaves_after_s)
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


def run(app, connection: Connection, headers: list | None = None, on_left=None) -> tuple[dict, float]:
    scope = {"type": "http", "path": "/v1/chat/completions", "headers": headers or []}
    started = time.monotonic()
    asyncio.run(CancelOnDisconnect(app, on_left)(scope, connection.receive, connection.send))
    return scope, time.monotonic() - started


def test_a_client_that_leaves_cancels_the_handling_at_once():
    cancelled = []

    async def slow_answer(scope, receive, send):
        await receive()  # the body
        try:
            await asyncio.sleep(30)  # generating
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    left = []
    scope, seconds = run(slow_answer, Connection(leaves_after_s=0.1), on_left=lambda: left.append(1))
    assert cancelled == [True] and seconds < 5
    assert scope["state"][CLIENT_LEFT] is True and left == [1]


def test_a_client_that_stays_gets_its_answer_and_errors_still_propagate():
    async def answer(scope, receive, send):
        await receive()
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    connection = Connection(leaves_after_s=None)
    scope, _ = run(answer, connection)
    assert [m["type"] for m in connection.sent] == ["http.response.start", "http.response.body"]
    assert CLIENT_LEFT not in scope.get("state", {})

    async def failing(scope, receive, send):
        await receive()
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run(failing, Connection(leaves_after_s=None))


def test_a_stream_listening_for_the_disconnect_still_hears_it():
    heard = []

    async def stream(scope, receive, send):
        await receive()  # the body
        heard.append((await receive())["type"])  # what a streaming response listens for

    run(stream, Connection(leaves_after_s=0.05))
    assert heard == ["http.disconnect"]


def test_once_the_answer_has_begun_a_disconnect_cancels_nothing():
    """BentoML closes an upload's files after the answer is sent, in the same call."""
    finished = []

    async def answer_then_clean_up(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        await asyncio.sleep(0.2)  # the client has its answer and leaves meanwhile
        finished.append(True)

    scope, _ = run(answer_then_clean_up, Connection(leaves_after_s=0.01))
    assert finished == [True] and CLIENT_LEFT not in scope.get("state", {})


def test_the_services_own_calls_are_left_to_their_caller():
    async def slow_answer(scope, receive, send):
        await receive()
        await asyncio.sleep(0.3)

    internal = [(INTERNAL_HEADER.encode(), INTERNAL_TOKEN.encode())]
    scope, seconds = run(slow_answer, Connection(leaves_after_s=0.01), headers=internal)
    assert seconds >= 0.3 and CLIENT_LEFT not in scope.get("state", {})


def _running(url: str) -> float:
    return metric(url, "glm4v_running_sequences")


def _give_up_on(url: str, call) -> float:
    """Make the call, which gives up after 2 s; return how long the server's generations ran on after that."""
    errors: list[BaseException] = []

    def calling() -> None:
        try:
            call()
        except BaseException as exc:  # raised again below, in the test's thread
            errors.append(exc)

    caller = threading.Thread(target=calling)
    caller.start()
    # Fails where the request never started generating (for a reason other than the fix).
    deadline = time.monotonic() + 10
    while _running(url) == 0:
        assert time.monotonic() < deadline, "the request did not start"
        time.sleep(0.05)
    caller.join()
    if errors:
        raise errors[0]
    left = time.monotonic()
    while _running(url) > 0 and time.monotonic() - left < 60:
        time.sleep(0.05)
    return time.monotonic() - left


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from glm4v_bento.devserver import Server

    with Server(tiny_model_dir, tmp_path_factory.mktemp("logs") / "serve.log") as srv:
        yield srv


def _leave(request) -> None:
    try:
        request()
    except httpx.ReadTimeout:
        return
    raise AssertionError("the answer came before the client gave up")


CANCELLED = 'glm4v_requests_total{finish_reason="cancelled"}'


def test_openai_generations_stop_when_the_client_gives_up(server):
    """8 rows of 8,000 tokens take tens of seconds here; the client gives up after 2."""
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000, "n": 8}
    body["ignore_eos"] = True
    url = f"{server.url}/v1/chat/completions"
    before = metric(server.url, CANCELLED), metric(server.url, "glm4v_generated_tokens_total")
    assert _give_up_on(server.url, lambda: _leave(lambda: httpx.post(url, json=body, timeout=2))) < 3
    # What they generated for nobody is still counted (and charged to the client's rate limit).
    assert metric(server.url, CANCELLED) == before[0] + 8
    assert metric(server.url, "glm4v_generated_tokens_total") >= before[1] + 8


def test_native_generations_stop_when_the_client_gives_up(server):
    requests_ = {"requests": [{"text_prompt": f"x{i}", "max_tokens": 8000, "ignore_eos": True} for i in range(8)]}
    files = [("image_files", ("a.png", encode(make_image(30, 30)), "image/png")) for _ in range(8)]

    def call():
        url = f"{server.url}/v1/vision/batch-inference"
        _leave(lambda: httpx.post(url, files=files, data={"batch_request": json.dumps(requests_)}, timeout=2))

    before = metric(server.url, "glm4v_clients_left_total"), metric(server.url, CANCELLED)
    assert _give_up_on(server.url, call) < 3
    assert metric(server.url, "glm4v_clients_left_total") == before[0] + 1
    assert metric(server.url, CANCELLED) == before[1] + 8
    deadline = time.monotonic() + 10
    while '"client_left": true' not in server.log():  # the access log line, written as the request ends
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
