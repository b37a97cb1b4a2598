"""One structured JSON log line per request: who, what route, status, tokens, timings.

Never the prompt text or image bytes, and never an API key (only its id). The handlers add
what only they know (tokens, timings) through ``note_result``; the line is written when the
response is done, failures and refusals included. A client that leaves stops its generations at
their next step: its line waits a moment (``ABANDONED_WAIT_S``) for what they had produced, so
the tokens it is charged for are in its line too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import threading
import time

from glm4v_bento.disconnects import CLIENT_LEFT
from glm4v_bento.engine import GenerationResult
from glm4v_bento.http_limits import ASGIApp, Message, Receive, Scope, Send, is_internal

logger = logging.getLogger("glm4v.access")
ABANDONED_WAIT_S = 2.0  # the longest a line waits for the results of generations its client left
SKIP_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/healthz"})
# The id the server gave the request: BentoML's on its APIs, the completion's on the OpenAI route.
_ID_HEADERS = frozenset({b"x-bentoml-request-id", b"x-request-id"})


def _client_request_id(scope: Scope) -> str | None:
    """The X-Request-ID the caller (or a gateway such as Envoy) sent, to follow a request across hops."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-request-id":
            return value.decode("latin-1")[:128]
    return None


def configure(stream=None) -> None:
    """Send access lines as JSON to stdout (once)."""
    from pythonjsonlogger.json import JsonFormatter

    if logger.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=False))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _Line:
    """One request's line while it is gathered: its fields, and the generations whose results it
    has not had. Results may come from the scheduler's thread (a client that left)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stats: dict = {}
        self.loop = loop
        self.lock = threading.Lock()
        self.owed: set[str] = set()  # request ids of generations started and not yet reported
        self.settled: asyncio.Future[None] | None = None  # set once nothing is owed, if awaited

    def note(self, result: GenerationResult) -> None:
        with self.lock:
            stats = self.stats
            stats["generations"] = stats.get("generations", 0) + 1
            stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + result.usage.prompt_tokens
            stats["completion_tokens"] = stats.get("completion_tokens", 0) + result.usage.completion_tokens
            stats["finish_reason"] = result.finish_reason
            stats["queue_s"] = round(max(stats.get("queue_s", 0.0), result.timings.queue_s), 4)
            stats["generation_s"] = round(max(stats.get("generation_s", 0.0), result.timings.total_s), 4)
            self.owed.discard(result.request_id or "")
            settled = self.settled if not self.owed else None
        if settled is not None:
            self.loop.call_soon_threadsafe(_settle, settled)

    async def results_owed(self, timeout_s: float) -> None:
        """Until every generation started for the request has reported (or ``timeout_s``)."""
        with self.lock:
            if not self.owed:
                return
            self.settled = settled = self.loop.create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(settled, timeout_s)


def _settle(settled: asyncio.Future[None]) -> None:
    if not settled.done():
        settled.set_result(None)


_line: contextvars.ContextVar[_Line | None] = contextvars.ContextVar("glm4v_access_line", default=None)


def expect_result(request_id: str | None) -> None:
    """A generation started for the current request: should its client leave, the line waits for it."""
    line = _line.get()
    if line is not None and request_id is not None:
        with line.lock:
            line.owed.add(request_id)


def note_result(result: GenerationResult) -> None:
    """Add a finished generation's tokens and timings to the current request's line (from any thread)."""
    line = _line.get()
    if line is not None:
        line.note(result)


class JsonAccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in SKIP_PATHS or is_internal(scope):
            await self.app(scope, receive, send)
            return
        line = _Line(asyncio.get_running_loop())
        stats = line.stats
        token = _line.set(line)
        started = time.perf_counter()
        response: dict = {"status": None, "request_id": None, "complete": False}

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() in _ID_HEADERS:
                        response["request_id"] = value.decode()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response["complete"] = True
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, watching_send)
        except BaseException:
            failed = True
            raise
        finally:
            _line.reset(token)
            if (scope.get("state") or {}).get(CLIENT_LEFT):
                stats["client_left"] = True  # before the answer: its work was stopped
            elif response["status"] is not None and not response["complete"] and not failed:
                stats["client_left"] = True  # in the middle of a streamed answer, which stopped there
            duration_s = round(time.perf_counter() - started, 4)  # the client's, not the wait below
            try:
                if stats.get("client_left") and not failed:  # its generations stop at their next step
                    await line.results_owed(ABANDONED_WAIT_S)
            finally:  # written even if that wait is cut short (the server stopping)
                _write(scope, response, duration_s, line)


def _write(scope: Scope, response: dict, duration_s: float, line: _Line) -> None:
    with line.lock:
        fields = dict(line.stats)
    logger.info(
        "request",
        extra={
            "request_id": response["request_id"],
            "client_request_id": _client_request_id(scope),
            "key_id": (scope.get("state") or {}).get("glm4v_key_id"),
            "method": scope.get("method"),
            "route": scope["path"],
            "status": response["status"],
            "duration_s": duration_s,
            **fields,
        },
    )
