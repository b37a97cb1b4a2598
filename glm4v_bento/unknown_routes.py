"""A path that is not served, or a method a route does not take: a JSON error that says so.

Starlette's routers answer those with a bare "Not Found" or "Method Not Allowed" in plain
text, which the openai client shows as "Error code: 404" and nothing else (calling
``completions.create`` or ``embeddings.create`` here, say). BentoML's own router answers
most of them and takes no handlers, so this ASGI middleware rewrites such plain-text
answers; every JSON error the APIs give themselves passes through untouched. Paths under
/v1/ get OpenAI's error shape, the native API's paths its own.
"""

from __future__ import annotations

import json

from glm4v_bento.http_limits import ASGIApp, Message, Receive, Scope, Send, error_body

OPENAI_ROUTES = "POST /v1/chat/completions, GET /v1/models and GET /v1/models/{model}"
_NATIVE_PREFIXES = ("/v1/vision/", "/v1/batch/")
_ROUTER_STATUSES = (404, 405)


def _openai_shaped(path: str) -> bool:
    return path.startswith("/v1/") and not path.startswith(_NATIVE_PREFIXES)


def route_error(method: str, path: str, status: int, allowed: str | None) -> dict:
    """The body for a router's refusal (404: no such path, 405: a method the path does not take)."""
    openai = _openai_shaped(path)
    if status == 405:
        message = f"{path} does not take {method}" + (f"; it takes {allowed}" if allowed else "")
        return error_body(status, message, "method_not_allowed", openai=openai)
    served = f"the OpenAI-compatible API here is {OPENAI_ROUTES}" if openai else "the APIs are listed at /"
    return error_body(status, f"no route for {method} {path}: {served} (and in /docs.json)", "not_found", openai=openai)


class JsonRouteErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # a plain-text refusal's start, until we replace its body

        async def rewriting_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and _is_plain_router_refusal(message):
                held = message
                return
            if held is None:
                await send(message)
                return
            if message.get("more_body", False):
                return  # the router's few bytes of text: dropped, our body replaces them
            headers = [
                (k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type", b"content-length")
            ]
            allowed = next((v.decode("latin-1") for k, v in headers if k.lower() == b"allow"), None)
            body = json.dumps(route_error(scope["method"], scope["path"], held["status"], allowed)).encode()
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": held["status"], "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)


def _is_plain_router_refusal(start: Message) -> bool:
    if start["status"] not in _ROUTER_STATUSES:
        return False
    content_type = next((v for k, v in start.get("headers", []) if k.lower() == b"content-type"), b"")
    return content_type.startswith(b"text/plain")
