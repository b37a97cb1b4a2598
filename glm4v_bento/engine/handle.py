"""A submitted request as its caller holds it: its result, its stream of events, its cancel switch.

The scheduler thread produces; callers consume from any thread (``result``) or from an
asyncio loop (``wait``, ``events``). Text deltas are only kept for handles that stream.

A caller that gives up (its ``wait`` cancelled, its stream closed before ``Finished``)
abandons the request: it is cancelled, and the result of what did run goes to the
``on_abandoned`` callbacks, so that work done for nobody is still accounted for.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from contextlib import aclosing
from dataclasses import dataclass

from glm4v_bento.engine.types import GenerationRequest, GenerationResult, TokenLogprob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDelta:
    """New generated text (raw: markers included; stop strings never leak into it), and the
    log-probabilities of the tokens generated since the last delta, when the request asked.
    A token's log-probability can come before its text (text held back for a stop string)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


StreamEvent = TextDelta | Finished


class RequestHandle:
    def __init__(self, request: GenerationRequest, *, stream: bool, on_cancel=None) -> None:
        self.request = request
        self.request_id = request.request_id
        self.streaming = stream
        self._future: Future[GenerationResult] = Future()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._buffer: list[StreamEvent] = []
        self._subscriber: tuple[asyncio.AbstractEventLoop, asyncio.Queue[StreamEvent]] | None = None
        self._taken = False  # a consumer has asked for the result (wait) or the events
        self._abandoned = False
        self._abandoned_reported = False
        self._abandoned_callbacks: list[Callable[[GenerationResult], object]] = []

    # --- caller side

    def cancel(self) -> None:
        """Ask the scheduler to stop this request at its next step (or drop it from the queue)."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel()

    def abandon(self) -> None:
        """The caller will not take the result: cancel the request, and hand its result (when
        it comes) to the ``on_abandoned`` callbacks. Only for a caller that has not had it."""
        with self._lock:
            self._abandoned = True
        self.cancel()
        self._report_abandoned()

    def on_abandoned(self, callback: Callable[[GenerationResult], object]) -> None:
        """Call ``callback(result)`` once if the request is abandoned; from the thread that ends
        it (the scheduler's, or the caller's that gives up after the result came)."""
        with self._lock:
            self._abandoned_callbacks.append(callback)
        self._report_abandoned()

    @property
    def taken(self) -> bool:
        """Whether a consumer has begun to wait for the result or to read the events: from then
        on, that consumer abandons the request if it leaves early."""
        return self._taken

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback) -> None:
        """Call ``callback(handle)`` once the request has its result (at once if it has)."""
        self._future.add_done_callback(lambda _: callback(self))

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self._future.result(timeout)

    async def wait(self) -> GenerationResult:
        """The final result; cancelling the awaiting task abandons the request (see ``abandon``)."""
        self._taken = True
        try:
            return await asyncio.shield(asyncio.wrap_future(self._future))
        except asyncio.CancelledError:
            self.abandon()
            raise

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Text deltas as they are produced, then one ``Finished``. Leaving early abandons the request."""
        if not self.streaming:
            raise RuntimeError("this request was not submitted with stream=True")
        self._taken = True
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        with self._lock:
            for event in self._buffer:
                queue.put_nowait(event)
            self._buffer.clear()
            self._subscriber = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = isinstance(event, Finished)
                yield event
        finally:
            if not finished:  # the consumer went away (client disconnected, timeout)
                self.abandon()

    # --- scheduler side

    def emit(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> None:
        if self.streaming and (text or logprobs):
            self._publish(TextDelta(text, tuple(logprobs)))

    def finish(self, result: GenerationResult) -> None:
        if self._future.done():
            return
        if self.streaming:
            self._publish(Finished(result))
        self._future.set_result(result)
        self._report_abandoned()

    def _report_abandoned(self) -> None:
        with self._lock:
            if not (self._abandoned and self._future.done()) or self._abandoned_reported:
                return
            self._abandoned_reported = True
            callbacks = list(self._abandoned_callbacks)
        result = self._future.result()
        for callback in callbacks:
            try:
                callback(result)
            except Exception:  # accounting must not stop the scheduler that ends requests
                logger.exception("a callback for an abandoned request failed")

    def _publish(self, event: StreamEvent) -> None:
        with self._lock:
            if self._subscriber is None:
                self._buffer.append(event)
                return
            loop, queue = self._subscriber
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.abandon()


async def merged_events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """(index, event) from every handle (streamed) as they come, until each has finished.
    Closing it early (the client left, one of them failed) abandons each handle whose
    ``Finished`` it has not passed on (cancelling those still running)."""
    if len(handles) == 1:  # the usual single stream: no tasks, no queue
        async with aclosing(handles[0].events()) as events:
            async for event in events:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | Exception]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for event in handle.events():
                queue.put_nowait((index, event))
        except Exception as exc:  # passed on: the merge must not wait for a Finished that never comes
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(index, handle)) for index, handle in enumerate(handles)]
    passed_on: set[int] = set()  # the handles whose Finished went to our consumer
    try:
        for _ in handles:  # until one Finished per handle
            while True:
                index, event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                finished = isinstance(event, Finished)
                if finished:
                    passed_on.add(index)
                yield index, event
                if finished:
                    break
    finally:
        for task in tasks:
            task.cancel()
        for index, handle in enumerate(handles):
            if index not in passed_on:  # its result, come or to come, reaches nobody
                handle.abandon()
