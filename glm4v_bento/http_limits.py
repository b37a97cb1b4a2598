"""ASGI middleware: concurrency limit (429), request-body limit (413) and body-read timeout (408)
for client requests.

BentoML's own ``traffic.max_concurrency`` also counts the service's calls to its own
batcher (they go through the same HTTP stack), so N concurrent clients need 2N slots and
the inner calls get 429s. This limiter counts client requests only: the service's own
calls carry a per-process secret header and pass through. A request holds its place while its
body arrives, so a body that stops arriving (a stalled or hostile client: 64 of them took every
place for good) is answered with 408 once no byte has come for ``body_timeout_s``, as nginx's
client_body_timeout does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INTERNAL_HEADER = "x-glm4v-internal"
INTERNAL_TOKEN = secrets.token_hex(16)  # known only inside this process
# Probes and metrics must answer even when the server is saturated.
OPENAI_PREFIXES = ("/v1/chat/", "/v1/models")
EXEMPT_PATHS = frozenset({"/health", "/livez", "/readyz", "/healthz", "/metrics", "/model/info"})


class RequestLimits:
    def __init__(
        self,
        app: ASGIApp,
        max_concurrency: int,
        max_body_bytes: int,
        on_reject: Callable[[str], None] | None = None,
        body_timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.on_reject = on_reject or (lambda reason: None)
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS or is_internal(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            message = f"the request body is {declared:,} bytes; the limit is {self.max_body_bytes:,}"
            self.on_reject("body_too_large")
            await _reply(scope, send, 413, message)
            return
        if self.active >= self.max_concurrency:
            message = f"too many requests in flight (limit {self.max_concurrency}); retry shortly"
            self.on_reject("concurrency")
            await _reply(scope, send, 429, message)
            return
        self.active += 1
        try:
            await self._run_bounded(scope, receive, send)
        finally:
            self.active -= 1

    async def _run_bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count body bytes as they arrive (chunked uploads declare no length); refuse past the limit,
        or when they stop arriving."""
        received = 0
        refused = False
        body_done = False
        answering = False  # the app has begun its answer: ours can no longer replace it

        async def bounded_receive() -> Message:
            nonlocal received, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # what comes now is a disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                self.on_reject("body_timeout")
                if not answering:
                    refused = True
                    reason = f"the request body stopped arriving: no bytes for {self.body_timeout_s:g} s"
                    await reply_error(scope, send, 408, reason, headers=[(b"connection", b"close")])
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    message = f"the request body exceeds the limit of {self.max_body_bytes:,} bytes"
                    self.on_reject("body_too_large")
                    await _reply(scope, send, 413, message)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answering
            if not refused:  # the 413 or 408 is the answer; whatever the app says after it is dropped
                answering = answering or message["type"] == "http.response.start"
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)


def is_internal(scope: Scope) -> bool:
    expected = INTERNAL_TOKEN.encode()
    return any(
        name == INTERNAL_HEADER.encode() and secrets.compare_digest(value, expected)
        for name, value in scope.get("headers", ())
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def openai_error_type(status: int) -> str:
    """The ``type`` OpenAI's error bodies give for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(
    status: int, message: str, code: str | None = None, *, openai: bool, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape (what its clients parse), or the native API's ``{"error": message}``."""
    if openai:
        return {"error": {"message": message, "type": openai_error_type(status), "param": param, "code": code}}
    return {"error": message}


async def reply_error(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with a JSON error: OpenAI's shape on the OpenAI routes, ``{"error": message}`` elsewhere."""
    body = json.dumps(error_body(status, message, code, openai=scope["path"].startswith(OPENAI_PREFIXES))).encode()
    all_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    all_headers += headers or []
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _reply(scope: Scope, send: Send, status: int, message: str) -> None:
    retry = [(b"retry-after", b"1")] if status == 429 else []
    await reply_error(scope, send, status, message, headers=retry)
