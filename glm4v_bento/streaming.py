"""Streamed answers as newline-delimited JSON: thinking and answer pieces, then a final event.

Each line is one JSON object:
    {"type": "thinking", "text": "..."}      a piece of the reasoning
    {"type": "answer", "text": "..."}        a piece of the answer (box markers removed)
    {"type": "done", ...}                    last line: finish_reason, usage, timings, the full
                                             text/thinking/answer/box, and error (if any)
The pieces of each type concatenate to the final event's ``thinking`` and ``answer``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from glm4v_bento.engine import Finished, GenerationResult, OutputParser, RequestHandle

MEDIA_TYPE = "application/x-ndjson"


def _line(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False) + "\n"


async def ndjson_events(
    handle: RequestHandle, request_id: str, on_done: Callable[[GenerationResult], object] | None = None
) -> AsyncIterator[str]:
    """The lines of one streamed request; closing the stream early cancels the request."""
    parser = OutputParser()
    async for event in handle.events():
        if isinstance(event, Finished):
            result = event.result
            if on_done is not None:  # before the next yield: a result received is reported, never lost
                on_done(result)
            for delta in parser.finish():
                yield _line({"type": delta.part, "text": delta.text})
            yield _line(
                {
                    "type": "done",
                    "request_id": request_id,
                    "finish_reason": result.finish_reason,
                    "error": result.error,
                    "usage": result.usage.model_dump(),
                    "timings": result.timings.model_dump(),
                    "text": result.text,
                    "thinking": result.thinking,
                    "answer": result.answer,
                    "box": result.box,
                }
            )
            return
        for delta in parser.feed(event.text):
            yield _line({"type": delta.part, "text": delta.text})
