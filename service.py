"""The BentoML service: a thin shell over the engine (``glm4v_bento``).

Every single-request API hands its item to ``generate_batch``, the one batchable API,
through BentoML's self-client, so concurrent requests from different clients are merged
by the adaptive batcher into one engine batch.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import anyio
import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from glm4v_bento import access_log, bentoml_fixes, client_error_logs, request_streams
from glm4v_bento.auth import ApiKeyAuth, load_keys
from glm4v_bento.bento_build import settings_inside_bento
from glm4v_bento.config import get_settings
from glm4v_bento.disconnects import CancelOnDisconnect
from glm4v_bento.engine import EngineClosedError, GenerationResult, QueueFullError, RequestHandle, SamplingParams
from glm4v_bento.http_limits import INTERNAL_HEADER, INTERNAL_TOKEN, RequestLimits
from glm4v_bento.image_urls import URLPolicy
from glm4v_bento.images import CheckedImage
from glm4v_bento.metrics import get_metrics
from glm4v_bento.model_source import ModelSource
from glm4v_bento.native_api import (
    ApiError,
    error_response,
    inference_response,
    read_image_upload,
    to_batch_item,
)
from glm4v_bento.openai_api import create_routes as openai_routes
from glm4v_bento.rate_limit import MemoryBuckets, RateLimiter, RateLimitMiddleware, RedisBuckets, current_client
from glm4v_bento.result_cache import MemoryResultCache, RedisResultCache
from glm4v_bento.schemas import (
    DEFAULT_PROMPT,
    BatchInferenceRequest,
    BatchInferenceResponse,
    BatchItem,
    BatchOutcome,
    GenerateResponse,
    InferenceRequest,
    InferenceResponse,
)
from glm4v_bento.serving import ModelHost, as_sent, internal_id, now_iso
from glm4v_bento.streaming import MEDIA_TYPE as STREAM_MEDIA_TYPE
from glm4v_bento.streaming import ndjson_events
from glm4v_bento.unknown_routes import JsonRouteErrors

settings = settings_inside_bento(get_settings(), Path(__file__).resolve().parent)
bentoml_fixes.install()
# The engine's progress (loading, compiling, warm-up, "model ready") at BentoML's own verbosity:
# the root logger BentoML sets up passes on warnings only, and the start could look stuck.
logging.getLogger("glm4v_bento").setLevel(logging.getLogger("bentoml").getEffectiveLevel())
source = ModelSource.from_settings(settings)
api_keys = load_keys(settings.api_keys, settings.api_keys_file)
limiter = RateLimiter(
    RedisBuckets(settings.redis_url, on_failure=lambda: get_metrics().redis_failures.labels("rate_limit").inc())
    if settings.redis_url
    else MemoryBuckets(),
    requests_per_minute=settings.rate_limit_rpm,
    tokens_per_minute=settings.rate_limit_tpm,
)


def _request_id() -> str:
    """The id BentoML also sends back in the X-BentoML-Request-ID header."""
    # BentoML keeps it in its (internal) trace context; the header is its 16-digit hex form.
    from bentoml._internal.context import trace_context

    request_id = trace_context.request_id
    return format(request_id, "016x") if request_id is not None else uuid.uuid4().hex[:16]


_REJECTION_REASONS = {400: "invalid_request", 413: "too_large", 429: "queue_full", 503: "not_ready", 504: "timeout"}


def _reject(reason: str) -> None:
    get_metrics().reject(reason)


def _error(status: int, message: str, request_id: str | None = None) -> JSONResponse:
    _reject(_REJECTION_REASONS.get(status, f"http_{status}"))
    headers = {"Retry-After": "5"} if status in (429, 503) else None
    return JSONResponse({"error": message, "request_id": request_id}, status_code=status, headers=headers)


async def _health(_: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    return JSONResponse(service.host.health().model_dump())


async def _model_info(_: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    if not service.host.ready:
        return _error(503, service.host.not_ready_message())
    return JSONResponse(service.host.model_info())


def _host() -> ModelHost:
    return bentoml.get_current_service().host


# Routes BentoML APIs cannot express: the tutorial's GET routes (BentoML APIs are POST-only)
# and the OpenAI-compatible API (its own request/response and error shapes).
url_policy = URLPolicy(
    allowed_hosts=frozenset(settings.image_url_allowed_hosts),
    max_bytes=settings.max_image_bytes,
    timeout_s=settings.image_url_timeout_s,
)
extra_routes = Starlette(
    routes=[
        Route("/health", _health),
        Route("/model/info", _model_info),
        *openai_routes(_host, settings.served_model_name or source.ref, url_policy, _reject),
    ]
)


@bentoml.asgi_app(extra_routes, path="/")
@bentoml.service(
    name="glm4v",
    resources={"gpu": 1, "gpu_type": settings.gpu_type},
    # max_concurrency is enforced by RequestLimits below, which does not count the service's own
    # calls to its batcher (BentoML's traffic.max_concurrency would, halving the real limit).
    traffic={"timeout": settings.request_timeout_s},
    workers=1,
    labels={"model": settings.model, "project": "glm4v-bento"},
    # Baked into a built Bento, so the image serves exactly the model it was built with.
    envs=[{"name": "GLM4V_MODEL", "value": settings.model}]
    + ([{"name": "GLM4V_REVISION", "value": settings.revision}] if settings.revision else []),
)
class GLM4V:
    # Declared on the class so that `bentoml build` pins and packages the model.
    model_ref = source.bentoml_model()

    def __init__(self) -> None:
        self.host = ModelHost(settings, source, resolve_path=lambda: source.local_path(self.model_ref))
        self.metrics = get_metrics()  # here, in the worker, where /metrics collects from
        self.host.on_result = self._report_result
        self.host.on_abandoned = self._report_result  # a client that left pays and is counted all the same
        self.host.on_started = self._track_generation
        self.host.on_step = self.metrics.observe_step
        self.host.drain_on_sigterm(settings.shutdown_grace_s)
        if settings.result_cache_bytes > 0:
            self.host.cache = (
                RedisResultCache(
                    settings.redis_url,
                    settings.result_cache_ttl_s,
                    on_failure=lambda: self.metrics.redis_failures.labels("result_cache").inc(),
                )
                if settings.redis_url
                else MemoryResultCache(settings.result_cache_bytes)
            )
            self.host.on_cache = self.metrics.cache_lookup

    def _report_result(self, result: GenerationResult) -> None:
        """Charge the client's tokens, count them and add them to its access-log line (from any
        thread, in the client's request context)."""
        limiter.charge_tokens(current_client.get(), result.usage.completion_tokens)
        self.metrics.observe_result(result)
        access_log.note_result(result)

    def _track_generation(self, handle: RequestHandle) -> None:
        """A generation started for the current request: its access-log line waits for it should
        the client leave, and a stream nobody began to read ends with the request."""
        access_log.expect_result(handle.request_id)
        if handle.streaming:
            request_streams.own(handle)

    def __is_ready__(self) -> bool:
        return self.host.ready

    def __is_alive__(self) -> bool:
        return self.host.alive

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.host.close()

    @bentoml.api(
        batchable=settings.adaptive_batching,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
        route="/v1/batch/generate",
    )
    async def generate_batch(self, items: list[BatchItem]) -> list[BatchOutcome]:
        """Adaptive-batching entry point: a list of items (images base64-encoded) -> one outcome each."""
        return await self.host.run_batch(items)

    def _self_client(self) -> Any:
        """BentoML's in-process client to this service, set up for heavy use by our own calls."""
        client = self.to_async
        if not getattr(client, "_glm4v_configured", False):
            # Mark our own calls so the client-request limits (RequestLimits) do not count them.
            client.default_headers.setdefault(INTERNAL_HEADER, INTERNAL_TOKEN)
            # BentoML recycles this client's session every 100 calls or 5 minutes, and closing it
            # cuts the calls still in flight ("Server disconnected" -> 500). In-process there is
            # no connection to refresh, so never recycle.
            manager = getattr(client, "_session_manager", None)
            if manager is not None:
                manager.max_requests, manager.max_age = sys.maxsize, float("inf")
            client._glm4v_configured = True
        return client

    async def _through_batcher(self, items: list[BatchItem], images: list[list[CheckedImage]]) -> list[BatchOutcome]:
        """Hand items to the adaptive batcher, their images (already decoded) to the host; wait
        here for their results."""
        secret_ids = [internal_id() for _ in items]
        claims = [self.host.claim(i, imgs) for i, imgs in zip(secret_ids, images, strict=True)]
        try:
            try:
                sent = [item.model_copy(update={"request_id": i}) for item, i in zip(items, secret_ids, strict=True)]
                outcomes = await self._self_client().generate_batch(sent)
            except BentoMLException as exc:
                status = exc.error_code.value
                message = "the server is overloaded; retry shortly" if status == 503 else str(exc)
                return [BatchOutcome(request_id=i.request_id, status=status, error=message) for i in items]
            outcomes = [BatchOutcome.model_validate(o) if isinstance(o, dict) else o for o in outcomes]
            finals = await asyncio.gather(*(self.host.result_of(o, c) for o, c in zip(outcomes, claims, strict=True)))
            return [as_sent(o, item.request_id) for o, item in zip(finals, items, strict=True)]
        except asyncio.CancelledError:  # timed out or the client left: stop the generations now
            for secret_id in secret_ids:
                self.host.cancel(secret_id)
            raise
        finally:
            for secret_id in secret_ids:
                self.host.release(secret_id)

    def _model_brief(self) -> tuple[str, str]:
        engine = self.host.engine
        return source.ref, str(engine.loaded.device) if engine else ""

    @bentoml.api(route="/v1/vision/inference")
    async def vision_inference(
        self, image_file: Path, request_data: InferenceRequest | None = None
    ) -> InferenceResponse:
        """The tutorial's API: multipart `image_file` + optional JSON `request_data`."""
        started, request_id = time.perf_counter(), _request_id()
        if not self.host.ready:
            return _error(503, self.host.not_ready_message(), request_id)
        request = request_data or InferenceRequest()
        try:
            image = await anyio.to_thread.run_sync(read_image_upload, image_file, self.host.limits, "image_file")
        except ApiError as exc:
            return _error(exc.status, exc.message, request_id)
        [outcome] = await self._through_batcher([to_batch_item(request_id, request)], [[image]])
        if outcome.status != 200:
            return _error(outcome.status, outcome.error or "request failed", request_id)
        return inference_response(request_id, outcome, started, *self._model_brief())

    @bentoml.api(route="/v1/vision/stream")
    async def vision_stream(
        self, image_file: Path, request_data: InferenceRequest | None = None
    ) -> AsyncGenerator[str, None]:
        """Same inputs as /v1/vision/inference; answers newline-delimited JSON as tokens are made:
        {"type": "thinking"|"answer", "text": ...} pieces, then one {"type": "done", ...}."""
        request_id = _request_id()
        if not self.host.ready:
            return _error(503, self.host.not_ready_message(), request_id)
        request = request_data or InferenceRequest()
        try:
            image = await anyio.to_thread.run_sync(read_image_upload, image_file, self.host.limits, "image_file")
            item = to_batch_item(request_id, request)
            handle = await anyio.to_thread.run_sync(self.host.submit_stream, request_id, [image], item)
        except ApiError as exc:
            return _error(exc.status, exc.message, request_id)
        except QueueFullError as exc:
            return _error(429, str(exc), request_id)
        except EngineClosedError as exc:
            return _error(503, str(exc), request_id)
        return StreamingResponse(
            ndjson_events(handle, request_id, self.host.completed),
            media_type=STREAM_MEDIA_TYPE,
            headers={"X-Request-ID": request_id},
        )

    @bentoml.api(route="/v1/vision/batch-inference")
    async def vision_batch_inference(
        self, image_files: list[Path], batch_request: BatchInferenceRequest
    ) -> BatchInferenceResponse:
        """The tutorial's batch API: `image_files` + JSON `batch_request` = {"requests": [...]}, in order."""
        started, request_id = time.perf_counter(), _request_id()
        if not self.host.ready:
            return _error(503, self.host.not_ready_message(), request_id)
        entries = batch_request.requests
        if len(image_files) != len(entries):
            return _error(
                400,
                f"{len(image_files)} image_files but {len(entries)} entries in batch_request.requests: "
                "send one entry per image, in the same order",
                request_id,
            )
        if len(entries) > settings.max_batch_items:
            return _error(
                400, f"{len(entries)} items in one batch request; the limit is {settings.max_batch_items}", request_id
            )

        responses: list[InferenceResponse | None] = [None] * len(entries)
        items: list[BatchItem] = []
        images: list[list[CheckedImage]] = []
        positions: list[int] = []
        for index, (path, entry) in enumerate(zip(image_files, entries, strict=True)):
            item_id = f"{request_id}-{index}"
            try:
                label = f"image_files[{index}]"
                image = await anyio.to_thread.run_sync(read_image_upload, path, self.host.limits, label)
            except ApiError as exc:
                responses[index] = error_response(item_id, exc.message, started)
                continue
            items.append(to_batch_item(item_id, entry))
            images.append([image])
            positions.append(index)
        if items:
            outcomes = await self._through_batcher(items, images)
            for index, outcome in zip(positions, outcomes, strict=True):
                responses[index] = inference_response(outcome.request_id, outcome, started, *self._model_brief())
        return BatchInferenceResponse(
            request_id=request_id,
            results=[r for r in responses if r is not None],
            total_processing_time=time.perf_counter() - started,
            timestamp=now_iso(),
        )

    @bentoml.api(route="/generate")
    async def generate(
        self,
        prompt: str = DEFAULT_PROMPT,
        images: list[Path] = Field(default_factory=list),  # noqa: B008 (BentoML reads the Field)
        system: str | None = None,
        params: SamplingParams | None = None,
        cache: bool = True,
    ) -> GenerateResponse:
        """Typed API for the BentoML client: images (files) + prompt + sampling params -> result."""
        request_id = _request_id()
        if not self.host.ready:
            return _error(503, self.host.not_ready_message(), request_id)
        request = InferenceRequest(text_prompt=prompt, system_prompt=system, cache=cache)
        uploads: list[CheckedImage] = []
        for index, path in enumerate(images):
            try:
                label = f"images[{index}]"
                uploads.append(await anyio.to_thread.run_sync(read_image_upload, path, self.host.limits, label))
            except ApiError as exc:
                return _error(exc.status, exc.message, request_id)
        item = to_batch_item(request_id, request).model_copy(update={"params": params or SamplingParams()})
        [outcome] = await self._through_batcher([item], [uploads])
        if outcome.status != 200 or outcome.result is None:
            return _error(outcome.status, outcome.error or "request failed", request_id)
        result: Any = outcome.result
        return GenerateResponse(
            request_id=request_id, model=source.ref, **result.model_dump(exclude={"request_id", "error", "error_type"})
        )


client_error_logs.install()

# Outermost first: log every request, who is calling, may they call now, is it within the limits,
# stop its streams nobody read when it ends, is its client still there, and (next to the router)
# a JSON error for a path nobody serves.
if settings.json_logs:
    access_log.configure()
    GLM4V.add_asgi_middleware(access_log.JsonAccessLog)
GLM4V.add_asgi_middleware(ApiKeyAuth, keys=api_keys, protect_metrics=settings.metrics_require_key, on_reject=_reject)
GLM4V.add_asgi_middleware(RateLimitMiddleware, limiter=limiter, on_reject=_reject)
GLM4V.add_asgi_middleware(
    RequestLimits,
    max_concurrency=settings.max_concurrency,
    max_body_bytes=settings.request_body_limit,
    on_reject=_reject,
    body_timeout_s=settings.body_timeout_s,
)
GLM4V.add_asgi_middleware(request_streams.StreamsEndWithTheirRequest)
GLM4V.add_asgi_middleware(CancelOnDisconnect, on_left=lambda: get_metrics().clients_left.inc())
GLM4V.add_asgi_middleware(JsonRouteErrors)
