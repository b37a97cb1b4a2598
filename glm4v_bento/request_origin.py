"""Where a piece of work came from: the context of the HTTP request that sent it.

Contextvars say who the current client is (rate limits) and which access-log line is being
written. Work that is finished elsewhere (by BentoML's adaptive batcher, in a task of its
own; by the scheduler's thread, when its client has left) is reported back in its origin.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any


class RequestOrigin:
    __slots__ = ("_context",)

    def __init__(self) -> None:
        self._context = contextvars.copy_context()  # the caller's, as it is now

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        # A copy each time: a context can be entered by one thread at a time, and two reports
        # may come at once (the loop's and the scheduler thread's).
        return self._context.copy().run(function, *args)

    def __deepcopy__(self, memo: dict) -> RequestOrigin:
        return self  # a copied item still came from the same request

    def __reduce__(self) -> tuple:
        return RequestOrigin, ()  # contexts do not travel: in another process, that process's
