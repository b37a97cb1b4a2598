"""One structured JSON log line per request: who, what route, status, tokens, timings.

Never the prompt text or image bytes, and never an API key (only its id). The handlers add
what only they know (tokens, timings) through ``note_result``; the line is written when the
response is done, failures and refusals included.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

from glm4v_bento.disconnects import CLIENT_LEFT
from glm4v_bento.engine import GenerationResult
from glm4v_bento.http_limits import ASGIApp, Message, Receive, Scope, Send, is_internal

logger = logging.getLogger("glm4v.access")
_stats: contextvars.ContextVar[dict | None] = contextvars.ContextVar("glm4v_request_stats", default=None)
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


def note_result(result: GenerationResult) -> None:
    """Add a finished generation's tokens and timings to the current request's line."""
    stats = _stats.get()
    if stats is None:
        return
    stats["generations"] = stats.get("generations", 0) + 1
    stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + result.usage.prompt_tokens
    stats["completion_tokens"] = stats.get("completion_tokens", 0) + result.usage.completion_tokens
    stats["finish_reason"] = result.finish_reason
    stats["queue_s"] = round(max(stats.get("queue_s", 0.0), result.timings.queue_s), 4)
    stats["generation_s"] = round(max(stats.get("generation_s", 0.0), result.timings.total_s), 4)


class JsonAccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in SKIP_PATHS or is_internal(scope):
            await self.app(scope, receive, send)
            return
        stats: dict = {}
        token = _stats.set(stats)
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
            _stats.reset(token)
            if (scope.get("state") or {}).get(CLIENT_LEFT):
                stats["client_left"] = True  # before the answer: its work was stopped
            elif response["status"] is not None and not response["complete"] and not failed:
                stats["client_left"] = True  # in the middle of a streamed answer, which stopped there
            logger.info(
                "request",
                extra={
                    "request_id": response["request_id"],
                    "client_request_id": _client_request_id(scope),
                    "key_id": (scope.get("state") or {}).get("glm4v_key_id"),
                    "method": scope.get("method"),
                    "route": scope["path"],
                    "status": response["status"],
                    "duration_s": round(time.perf_counter() - started, 4),
                    **stats,
                },
            )
