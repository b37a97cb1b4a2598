"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{id}``.

The thinking goes to ``reasoning_content`` and the answer to ``content`` (box markers
removed), streamed or not; requests run on the same scheduler as the native APIs. Errors
use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
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
    merged_events,
)
from glm4v_bento.http_limits import error_body, openai_error_type
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

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, openai=True, param=self.param)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "5"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def create_routes(
    get_host: Callable[[], ModelHost],
    served_model: str,
    url_policy: URLPolicy,
    on_reject: Callable[[str], None] = lambda reason: None,
) -> list[Route]:
    started = int(time.time())  # "created": when this server began serving the model, the same in every answer

    def model_card() -> dict[str, Any]:
        return {"id": served_model, "object": "model", "created": started, "owned_by": "glm4v-bento"}

    async def list_models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def retrieve_model(request: Request) -> Response:  # the openai client's models.retrieve
        asked = request.path_params["model"]
        if asked != served_model:
            message = f"the model {asked!r} does not exist; this server serves {served_model!r}"
            return OpenAIError(404, message, "model", "model_not_found").response()
        return JSONResponse(model_card())

    async def chat_completions(request: Request) -> Response:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        response = await answer(request, completion_id)
        # What the openai client reads as `_request_id`; the access log records it too.
        response.headers["x-request-id"] = completion_id
        return response

    async def answer(request: Request, completion_id: str) -> Response:
        host = get_host()
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
                    # A stored answer may have no logprobs, and is one choice.
                    body.cache and not body.logprobs and body.n == 1,
                    images=prepared.image_bytes,
                    prompt=generation.prompt,
                    system=generation.system,
                    history=prepared.history,
                )
            handles = [] if hit is not None else _submit(host, _choices(generation, body.n), body.stream)
        except OpenAIError as exc:
            on_reject(exc.code or exc.type)
            return exc.response()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse_events(handles, completion_id, served_model, include_usage, host.completed)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if hit is not None:
            results = [hit]
        else:
            results = await host.results_of(handles)
        failed = [result for result in results if result.finish_reason not in ("stop", "length")]
        if failed:
            return _failure(failed[0]).response()
        completion = ChatCompletion(
            id=completion_id,
            created=int(time.time()),
            model=served_model,
            choices=[
                Choice(
                    index=index,
                    message=ResponseMessage(content=result.answer, reasoning_content=result.thinking or None),
                    logprobs=_choice_logprobs(result.logprobs) if result.logprobs is not None else None,
                    finish_reason=result.finish_reason,
                )
                for index, result in enumerate(results)
            ],
            usage=_usage(results),
        )
        cached = "hit" if results[0].cached else "miss"
        return JSONResponse(completion.model_dump(), headers={"X-GLM4V-Cache": cached})

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),  # ids may hold slashes
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
        if not param:
            raise OpenAIError(400, "the request body must be a JSON object") from None
        if first["type"] == "extra_forbidden":
            raise OpenAIError(400, f"unrecognized request argument: {param}", param) from None
        raise OpenAIError(400, f"{param}: {first['msg']}", param) from None
    if unsupported := body.unsupported():
        param, reason = unsupported
        raise OpenAIError(400, f"{param}: {reason}", param, "unsupported_parameter")
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
    instructions = ("system", "developer")
    for index, message in enumerate(body.messages):
        if message.role in instructions and _has_images(message):  # the prompt has no place for them
            raise OpenAIError(400, f"{message.role} messages cannot carry images", f"messages.{index}.content")
    system = "\n".join(_text(m) for m in body.messages if m.role in instructions) or None
    turns = [(i, m) for i, m in enumerate(body.messages) if m.role not in instructions]
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


def _has_images(message: Message) -> bool:
    return isinstance(message.content, list) and any(isinstance(part, ImagePart) for part in message.content)


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


def _choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The request once per choice. With a seed, choice i samples with seed + i: the choices
    differ, and the whole answer repeats."""
    if n == 1:
        return [request]
    seed = request.params.seed
    return [
        replace(
            request,
            request_id=f"{request.request_id}-{index}",
            params=request.params
            if seed is None
            else request.params.model_copy(update={"seed": (seed + index) % 2**63}),
        )
        for index in range(n)
    ]


def _submit(host: ModelHost, requests: list[GenerationRequest], stream: bool) -> list[RequestHandle]:
    """All the choices start, or none does (429 when there is no room for all of them)."""
    handles: list[RequestHandle] = []
    try:
        if stream:
            for request in requests:
                handles.append(host.open_stream(request))
        else:
            handles = host.submit_all(requests)  # withdraws them all itself when one is refused
    except (QueueFullError, EngineClosedError) as exc:
        for handle in handles:  # the streams opened before the refusal
            handle.cancel()
        status, code = (429, "queue_full") if isinstance(exc, QueueFullError) else (503, "shutting_down")
        raise OpenAIError(status, str(exc), code=code) from None
    return handles


def _usage(results: list[GenerationResult]) -> CompletionUsage:
    """The prompt once, the completion tokens of every choice."""
    prompt = results[0].usage.prompt_tokens
    completion = sum(result.usage.completion_tokens for result in results)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _choice_logprobs(entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    """The engine's log-probabilities in OpenAI's shape."""
    content = [
        ChatCompletionTokenLogprob(
            token=entry.token,
            logprob=entry.logprob,
            bytes=entry.bytes,
            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in entry.top_logprobs],
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
    handles: list[RequestHandle],
    completion_id: str,
    model: str,
    include_usage: bool,
    on_done: Callable[[GenerationResult], object],
) -> AsyncIterator[str]:
    """Per choice: role first; reasoning_content pieces; content pieces; finish_reason. Then the
    usage of all choices (if asked) and [DONE]. A choice that fails ends the stream with an error."""
    created = int(time.time())
    parsers = [OutputParser() for _ in handles]
    results: list[GenerationResult] = []
    for index in range(len(handles)):
        yield _chunk(completion_id, model, created, index=index, delta=ChunkDelta(role="assistant", content=""))
    async with aclosing(merged_events(handles)) as events:
        async for index, event in events:
            if isinstance(event, Finished):  # before the next yield: a result received is reported, never lost
                on_done(event.result)
            parser = parsers[index]
            deltas = parser.finish() if isinstance(event, Finished) else parser.feed(event.text)
            pieces = [{"reasoning_content": d.text} if d.part == "thinking" else {"content": d.text} for d in deltas]
            logprobs = None if isinstance(event, Finished) or not event.logprobs else _choice_logprobs(event.logprobs)
            if logprobs is not None and not pieces:  # tokens whose text is not out yet (markers, held back)
                pieces = [{}]
            for number, piece in enumerate(pieces):
                # This event's tokens go with its last piece.
                extra = {"logprobs": logprobs} if logprobs is not None and number == len(pieces) - 1 else {}
                yield _chunk(completion_id, model, created, index=index, delta=ChunkDelta(**piece), **extra)
            if not isinstance(event, Finished):
                continue
            result = event.result
            if result.finish_reason not in ("stop", "length"):
                yield f"data: {json.dumps(_failure(result).body())}\n\n"
                break  # the other choices are cancelled on the way out
            results.append(result)
            yield _chunk(
                completion_id, model, created, index=index, delta=ChunkDelta(), finish_reason=result.finish_reason
            )
    if include_usage and len(results) == len(handles):
        yield _chunk(completion_id, model, created, usage=_usage(results))
    yield "data: [DONE]\n\n"
