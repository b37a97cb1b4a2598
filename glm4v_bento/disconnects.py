"""When a client goes away, its request's work stops (ASGI middleware).

A handler that is not streaming reads nothing from the connection once it has the body, so
nobody noticed a client that gave up (its timeout, Ctrl-C, an SDK about to retry): the
generation ran to its end, holding a place in the batch while the retries queued behind it.
Here the connection is watched once the body is in, and a disconnect cancels the handling;
the handlers turn that into cancelling their generations (RequestHandle.wait, the service's
batcher path). A response that has begun is left to finish: streams stop on a disconnect
themselves, and an answer already sent still runs its background work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from glm4v_bento.http_limits import ASGIApp, Message, Receive, Scope, Send, is_internal

CLIENT_LEFT = "glm4v_client_left"  # set in the request's state, for the access log


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp, on_left: Callable[[], None] | None = None) -> None:
        """``on_left`` is called for each request whose client left before its answer (a metric)."""
        self.app = app
        self.on_left = on_left or (lambda: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The service's calls to its own batcher are cancelled by the request that made them.
        if scope["type"] != "http" or is_internal(scope):
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()
        watcher: asyncio.Task | None = None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def app_receive() -> Message:
            nonlocal watcher
            if watcher is not None:  # the body is in and the watcher owns the connection
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                watcher = asyncio.ensure_future(watch())
            return message

        answering = False

        async def app_send(message: Message) -> None:
            nonlocal answering
            answering = answering or message["type"] == "http.response.start"
            await send(message)

        handling = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        left = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({handling, left}, return_when=asyncio.FIRST_COMPLETED)
            # Once an answer has begun, a stream sees the disconnect itself (through app_receive),
            # and an answer already sent finishes its background work (BentoML closes the upload's files).
            if not handling.done() and not answering:  # the client left before any answer
                scope.setdefault("state", {})[CLIENT_LEFT] = True
                self.on_left()
                handling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handling
                return
            await handling  # its result, or its error
        except asyncio.CancelledError:  # this request itself was cancelled (timeout, shutdown)
            handling.cancel()
            raise
        finally:
            left.cancel()
            if watcher is not None:
                watcher.cancel()
