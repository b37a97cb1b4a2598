"""A request's streams end with it (ASGI middleware).

A streamed answer abandons its generation when its stream is closed early, but only once the
stream has begun: the handler returns a response whose body has not run yet. Should the request
end before that (its client gone while the response was on its way, a handler cancelled while
its stream was being submitted), nothing would ever read or stop the generation, and it would
run to its last token for nobody, holding a place among the open streams. Here every stream
opened for a request is remembered, and when the request ends, those nobody began to read are
abandoned: stopped at their next step, their tokens still charged and counted.
"""

from __future__ import annotations

import contextvars
import threading
from typing import TYPE_CHECKING

from glm4v_bento.http_limits import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from glm4v_bento.engine import RequestHandle


class _Streams:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # streams are opened on worker threads
        self.handles: list[RequestHandle] = []
        self.ended = False


_streams: contextvars.ContextVar[_Streams | None] = contextvars.ContextVar("glm4v_request_streams", default=None)


def own(handle: RequestHandle) -> None:
    """``handle`` is a stream opened for the current request; one opened after the request ended
    (its submission outlived the handler) is abandoned at once."""
    streams = _streams.get()
    if streams is None:
        return
    with streams.lock:
        if not streams.ended:
            streams.handles.append(handle)
            return
    handle.abandon()


class StreamsEndWithTheirRequest:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streams = _Streams()
        token = _streams.set(streams)
        try:
            await self.app(scope, receive, send)
        finally:
            _streams.reset(token)
            with streams.lock:
                streams.ended = True
                handles = list(streams.handles)
            for handle in handles:
                if not handle.taken:  # a stream that began is its reader's to abandon
                    handle.abandon()
