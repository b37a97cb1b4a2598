"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The thinking goes to ``reasoning_content`` and the answer to ``content`` (box markers
removed), streamed or not; requests run on the same scheduler as the native APIs. Errors
use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from glm4v_bento.engine import (
    EngineClosedError,
    Finished,
    GenerationRequest,
    GenerationResult,
    OutputParser,
    QueueFullError,
    RequestHandle,
    SamplingParams,
    TokenLogprob,
    Turn,
)
from glm4v_bento.http_limits import openai_error_type
from glm4v_bento.image_urls import ImageURLError, URLPolicy, image_bytes
from glm4v_bento.images import CheckedImage, ImageError, check_image
from glm4v_bento.openai_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
    ImagePart,
    Message,
    ResponseMessage,
    TopLogprob,
)
from glm4v_bento.serving import ModelHost, image_error_status


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return openai_error_type(self.status)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "5"} if self.status in (429, 503) else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def create_routes(
    get_host: Callable[[], ModelHost],
    served_model: str,
    url_policy: URLPolicy,
    on_reject: Callable[[str], None] = lambda reason: None,
) -> list[Route]:
    async def list_models(_: Request) -> Response:
        created = int(time.time())
        model = {"id": served_model, "object": "model", "created": created, "owned_by": "glm4v-bento"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(request: Request) -> Response:
        host = get_host()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            body = await _parse(request)
            if body.model != served_model:
                raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves {served_model!r}",
                                  "model", "model_not_found")  # fmt: skip
            if not host.ready or host.engine is None:
                raise OpenAIError(503, host.not_ready_message(), code="model_not_ready")
            prepared = await _to_generation_request(body, host, url_policy, completion_id)
            generation = prepared.request
            hit = None
            if not body.stream:
                hit = await host.cached_answer(
                    completion_id,
                    generation.params,
                    body.cache and not body.logprobs,  # a stored answer may have none
                    images=prepared.image_bytes,
                    prompt=generation.prompt,
                    system=generation.system,
                    history=prepared.history,
                )
            try:
                if hit is not None:
                    handle = None
                elif body.stream:
                    handle = host.open_stream(generation)
                else:
                    handle = host.engine.submit(generation)
            except QueueFullError as exc:
                raise OpenAIError(429, str(exc), code="queue_full") from None
            except EngineClosedError as exc:
                raise OpenAIError(503, str(exc), code="shutting_down") from None
        except OpenAIError as exc:
            on_reject(exc.code or exc.type)
            return exc.response()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse_events(handle, completion_id, served_model, include_usage, host.completed)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = hit if handle is None else host.completed(await handle.wait())
        if result.finish_reason not in ("stop", "length"):
            return _failure(result).response()
        completion = ChatCompletion(
            id=completion_id,
            created=int(time.time()),
            model=served_model,
            choices=[
                Choice(
                    message=ResponseMessage(content=result.answer, reasoning_content=result.thinking or None),
                    logprobs=_choice_logprobs(result.logprobs) if result.logprobs is not None else None,
                    finish_reason=result.finish_reason,
                )
            ],
            usage=CompletionUsage(**result.usage.model_dump()),
        )
        return JSONResponse(completion.model_dump(), headers={"X-GLM4V-Cache": "hit" if result.cached else "miss"})

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]


async def _parse(request: Request) -> ChatCompletionRequest:
    # A body with images inlined as data: URIs runs to tens of megabytes: parsed on a worker
    # thread, so the event loop (every other request) does not wait for it.
    return await anyio.to_thread.run_sync(_parse_body, await request.body())


def _parse_body(body: bytes) -> ChatCompletionRequest:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OpenAIError(400, "the request body is not valid JSON") from None
    try:
        body = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        raise OpenAIError(400, f"{param}: {first['msg']}", param) from None
    if body.n != 1:
        raise OpenAIError(400, "only n=1 is supported", "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    return body


@dataclass
class _Prepared:
    request: GenerationRequest
    image_bytes: list[bytes]  # the last message's, for the result cache key
    history: list[tuple[str, str, list[bytes]]]


async def _to_generation_request(
    body: ChatCompletionRequest, host: ModelHost, policy: URLPolicy, request_id: str
) -> _Prepared:
    system = "\n".join(_text(m) for m in body.messages if m.role == "system") or None
    turns = [(i, m) for i, m in enumerate(body.messages) if m.role != "system"]
    if not turns or turns[-1][1].role != "user":
        raise OpenAIError(400, "the last message must come from the user", "messages")
    history, raw_history = [], []
    for index, message in turns[:-1]:
        images = await _images(message, index, host, policy)
        if images and message.role == "assistant":
            raise OpenAIError(400, "assistant messages cannot carry images", f"messages.{index}.content")
        history.append(Turn(message.role, _text(message), [i.image for i in images]))
        raw_history.append((message.role, _text(message), [i.data for i in images]))
    last_index, last = turns[-1]
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    try:
        params = SamplingParams(
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,  # None: the model's default
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise OpenAIError(400, f"{first['loc'][0]}: {first['msg']}", str(first["loc"][0])) from None
    images = await _images(last, last_index, host, policy)
    request = GenerationRequest(
        prompt=_text(last),
        images=[i.image for i in images],
        system=system,
        history=history,
        params=params,
        request_id=request_id,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    return _Prepared(request, [i.data for i in images], raw_history)


def _text(message: Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "\n".join(part.text for part in message.content if not isinstance(part, ImagePart))


async def _images(message: Message, index: int, host: ModelHost, policy: URLPolicy) -> list[CheckedImage]:
    """The message's images, as sent and decoded."""
    if not isinstance(message.content, list):
        return []
    images = []
    for number, part in enumerate(message.content):
        if not isinstance(part, ImagePart):
            continue
        param = f"messages.{index}.content.{number}.image_url"
        try:
            data = await image_bytes(part.image_url.url, policy)
            images.append(await anyio.to_thread.run_sync(check_image, data, host.limits))
        except ImageURLError as exc:
            raise OpenAIError(400, str(exc), param, "invalid_image_url") from None
        except ImageError as exc:
            raise OpenAIError(image_error_status(exc), str(exc), param, "invalid_image") from None
    return images


def _failure(result: GenerationResult) -> OpenAIError:
    if result.finish_reason == "error" and result.error_type == "invalid_request":
        return OpenAIError(400, result.error or "invalid request")
    if result.finish_reason == "cancelled":
        return OpenAIError(503, "the request was cancelled (the server is shutting down or overloaded)")
    return OpenAIError(500, result.error or "generation failed")


def _choice_logprobs(entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    """The engine's log-probabilities in OpenAI's shape (which adds each token's UTF-8 bytes)."""
    content = [
        ChatCompletionTokenLogprob(
            token=entry.token,
            logprob=entry.logprob,
            bytes=list(entry.token.encode()),
            top_logprobs=[
                TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode())) for t in entry.top_logprobs
            ],
        )
        for entry in entries
    ]
    return ChoiceLogprobs(content=content)


def _chunk(completion_id: str, model: str, created: int, **choice: Any) -> str:
    usage = choice.pop("usage", None)
    choices = [ChunkChoice(**choice)] if choice else []
    chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, usage=usage)
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


async def _sse_events(
    handle: RequestHandle,
    completion_id: str,
    model: str,
    include_usage: bool,
    on_done: Callable[[GenerationResult], object],
) -> AsyncIterator[str]:
    """role first; reasoning_content pieces; content pieces; finish_reason; usage (if asked); [DONE]."""
    created = int(time.time())
    parser = OutputParser()
    yield _chunk(completion_id, model, created, delta=ChunkDelta(role="assistant", content=""))
    async for event in handle.events():
        deltas = parser.finish() if isinstance(event, Finished) else parser.feed(event.text)
        pieces = [{"reasoning_content": d.text} if d.part == "thinking" else {"content": d.text} for d in deltas]
        logprobs = None if isinstance(event, Finished) or not event.logprobs else _choice_logprobs(event.logprobs)
        if logprobs is not None and not pieces:  # tokens whose text is not out yet (markers, held back)
            pieces = [{}]
        for number, piece in enumerate(pieces):
            # This event's tokens go with its last piece.
            extra = {"logprobs": logprobs} if logprobs is not None and number == len(pieces) - 1 else {}
            yield _chunk(completion_id, model, created, delta=ChunkDelta(**piece), **extra)
        if isinstance(event, Finished):
            result = event.result
            on_done(result)
            if result.finish_reason in ("stop", "length"):
                yield _chunk(completion_id, model, created, delta=ChunkDelta(), finish_reason=result.finish_reason)
                if include_usage:
                    yield _chunk(completion_id, model, created, usage=CompletionUsage(**result.usage.model_dump()))
            else:
                error = _failure(result)
                body = {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
                yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
