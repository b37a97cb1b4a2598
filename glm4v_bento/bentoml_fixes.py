"""Three fixes to BentoML (1.4) behaviour, installed once when the service module loads.

1. File fields take uploaded files only, and a malformed multipart body (no boundary, say) is
   a 400, not a 500. BentoML's multipart parser treats a *text* value
   in a file field as a URL and downloads it (on this stack its address guard even fails
   with a 500). A server that fetches URLs named by clients is a surprise at best and a way
   into internal networks at worst, so such a value is refused with a 400 saying what to send.
2. Root models (such as the batcher's list of items) regenerate their JSON schema on every
   request, when parsing the input and again when choosing the response's media type; under
   load that was about a quarter of the server's CPU. A type's schema never changes, so it is
   generated once per type and copied out.
3. The request-timeout middleware arms a timer per request and leaves it armed after the
   request is answered, so every request is held in memory until its timeout (600 s here)
   has passed: under load, gigabytes. Here the timer is cancelled when the request ends;
   the behaviour is otherwise the same (504 if no response has started in time), except
   that the OpenAI routes answer it in OpenAI's error shape, as their other errors.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException


def install() -> None:
    _refuse_text_in_file_fields()
    _cache_root_model_schemas()
    _disarm_request_timers()


def _disarm_request_timers() -> None:
    from bentoml._internal.server.http import traffic

    from glm4v_bento.http_limits import reply_error

    middleware = traffic.TimeoutMiddleware
    if getattr(middleware, "_glm4v_fixed", False):
        return

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # done once the response has started

        def expire() -> None:
            if not started.done():
                started.set_exception(TimeoutError())

        timer = loop.call_later(self.timeout, expire)

        async def watching_send(message: Any) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        handling = asyncio.ensure_future(self.app(scope, receive, watching_send))
        try:
            await started
        except TimeoutError:
            if handling.cancel():
                message = f"the request was not answered within {self.timeout} seconds"
                await reply_error(scope, send, 504, message, code="timeout")
            return
        finally:
            timer.cancel()  # the fix: nothing keeps the finished request alive
        await handling

    middleware.__call__ = call
    middleware._glm4v_fixed = True


def _cache_root_model_schemas() -> None:
    from _bentoml_sdk.io_models import IORootModel

    if getattr(IORootModel, "_glm4v_fixed", False):
        return
    generate = IORootModel.model_json_schema.__func__
    cache: dict[tuple, dict[str, Any]] = {}

    def model_json_schema(cls: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = generate(cls, *args, **kwargs)
        return copy.deepcopy(cache[key])  # callers may edit what they get

    IORootModel.model_json_schema = classmethod(model_json_schema)
    IORootModel._glm4v_fixed = True


def _refuse_text_in_file_fields() -> None:
    """Replace BentoML's multipart parser with one that refuses non-file values in file fields."""
    from _bentoml_impl import serde

    if getattr(serde.ALL_SERDE["multipart/form-data"], "_uploads_only", False):
        return

    class UploadsOnlyMultipartSerde(serde.MultipartSerde):
        _uploads_only = True

        async def parse_request(self, request: Any, cls: Any) -> Any:
            try:
                form = await request.form()  # Starlette caches it; the parent reads the same form
            except (MultiPartException, HTTPException) as exc:  # e.g. no boundary: the client's mistake
                reason = getattr(exc, "message", None) or getattr(exc, "detail", "")
                error = ValueError(f"malformed multipart/form-data body ({reason})")
                detail: InitErrorDetails = {
                    "type": "value_error",
                    "loc": ("body",),
                    "input": "",
                    "ctx": {"error": error},
                }
                raise ValidationError.from_exception_data("Input", [detail]) from None
            errors: list[InitErrorDetails] = [
                {
                    "type": "value_error",
                    "loc": (field, index),
                    "input": "(text)",
                    "ctx": {"error": ValueError("must be an uploaded file (multipart file part), not a text value")},
                }
                for field in cls.multipart_fields
                for index, value in enumerate(form.getlist(field))
                if not isinstance(value, UploadFile)
            ]
            if errors:
                raise ValidationError.from_exception_data("Input", errors)
            return await super().parse_request(request, cls)

    for media_type, parser in list(serde.ALL_SERDE.items()):
        if parser is serde.MultipartSerde:
            serde.ALL_SERDE[media_type] = UploadsOnlyMultipartSerde
