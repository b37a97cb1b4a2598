"""The model as the service holds it: loaded in the background, warmed up, health and info.

Free of BentoML so it can be tested alone; ``service.py`` wraps it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from PIL import Image

from glm4v_bento.config import Settings
from glm4v_bento.engine import (
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    PromptError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
)
from glm4v_bento.images import CheckedImage, ImageError, ImageLimits, check_image
from glm4v_bento.model_source import ModelSource, revision_of
from glm4v_bento.request_origin import RequestOrigin
from glm4v_bento.result_cache import MemoryResultCache, ResultCache, cache_key, is_deterministic
from glm4v_bento.schemas import BatchItem, BatchOutcome, HealthResponse

if TYPE_CHECKING:
    from glm4v_bento.engine import Engine

logger = logging.getLogger(__name__)

# The long warm-up's prompt, in words of one token each: past 1024 columns, like a photo's
# prompt (a 1024x1024 image is about 1.4k tokens), and far within any context limit.
LONG_WARMUP_WORDS = 1500

# Writes to a remote result cache, made in order off the event loop.
_cache_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4v-cache")


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def image_error_status(error: ImageError) -> int:
    """Too many bytes is 413 (payload too large); every other image refusal is 400."""
    return 413 if error.reason == "too_many_bytes" else 400


class ModelHost:
    """Loads the engine on a background thread so the server can answer probes meanwhile."""

    def __init__(self, settings: Settings, source: ModelSource, resolve_path: Callable[[], str]) -> None:
        self.settings = settings
        self.source = source
        self.limits = ImageLimits.from_settings(settings)
        self.engine: Engine | None = None
        self.model_path: str | None = None
        self.error: str | None = None
        # Items whose caller is in this process and waits for them itself (see ``claim``).
        self._claims: dict[str, asyncio.Future[RequestHandle]] = {}
        self._claimed_images: dict[str, list[CheckedImage]] = {}
        # Told of every result a client receives (rate-limit charging, metrics), in its request's context.
        self.on_result: Callable[[GenerationResult], None] | None = None
        # Told of what ran for a client that left before its result (finish_reason "cancelled"
        # mostly), in that request's context but from any thread: charged and counted all the same.
        self.on_abandoned: Callable[[GenerationResult], None] | None = None
        # Told of each generation started for a client, in that client's request context: its
        # result will come to on_result or on_abandoned.
        self.on_started: Callable[[RequestHandle], None] | None = None
        # Told after every scheduler step: (rows running, requests waiting, what says how decode steps run).
        self.on_step: Callable[[int, int, Callable[[], dict[str, bool | int]]], None] | None = None
        self.cache: ResultCache | None = None
        self.on_cache: Callable[[bool], None] | None = None  # told of each lookup (hit or miss)
        self._cache_keys: dict[str, str] = {}  # request id -> key, until the result is stored
        self._open_streams = 0
        self._streams_lock = threading.Lock()
        self._ready = threading.Event()
        self._loader = threading.Thread(target=self._load, args=(resolve_path,), name="glm4v-loader", daemon=True)
        self._loader.start()

    # --- lifecycle

    def _load(self, resolve_path: Callable[[], str]) -> None:
        try:
            from glm4v_bento.engine import Engine  # torch and transformers: only where the model runs

            started = time.perf_counter()
            self.model_path = resolve_path()
            engine = Engine.from_settings(self.settings.model_copy(update={"model": self.model_path}))
            engine.scheduler.on_step = lambda running, waiting: self._observe_step(engine, running, waiting)
            if self.settings.warmup_tokens > 0:
                self._warm_up(engine)
            self.engine = engine
            self._ready.set()
            logger.info("model ready after %.1f s (load + warm-up)", time.perf_counter() - started)
        except Exception as exc:
            logger.exception("loading the model failed")
            self.error = f"loading the model failed: {type(exc).__name__}: {exc}"

    def _observe_step(self, engine: Engine, running: int, waiting: int) -> None:
        # self.on_step is read here, at each step: it may be set after loading began.
        if self.on_step is not None:
            self.on_step(running, waiting, engine.runner.decode_path)

    def _warm_up(self, engine: Engine) -> None:
        """One short generation with an image, so the first real request pays no start-up costs.
        Where decode steps are compiled, also a few steps of two rows over a long context: one
        row and batches are compiled apart, and a compilation stalls every stream (on an H200
        one also came when the context length changed), so they are done before ready."""
        started = time.perf_counter()
        params = SamplingParams(max_new_tokens=self.settings.warmup_tokens, ignore_eos=True)
        image = Image.new("RGB", (112, 112), (128, 128, 128))
        [result] = engine.generate([GenerationRequest("warm-up", images=[image], params=params)])
        if result.finish_reason == "error":
            raise RuntimeError(f"warm-up generation failed: {result.error}")
        if engine.runner.compiled is not None:
            self._warm_up_long_context(engine)
        logger.info("warm-up done in %.2f s", time.perf_counter() - started)

    def _warm_up_long_context(self, engine: Engine) -> None:
        """Not fatal when it fails: it only moves a possible compilation out of serving time."""
        params = SamplingParams(max_new_tokens=min(4, self.settings.warmup_tokens), ignore_eos=True)
        try:
            results = engine.generate([GenerationRequest("the " * LONG_WARMUP_WORDS, params=params) for _ in range(2)])
            error = next((result.error for result in results if result.finish_reason == "error"), None)
        except PromptError as exc:
            error = str(exc)
        if error:
            logger.warning("the long-context warm-up failed (%s): a first long request may compile again", error)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.alive

    @property
    def alive(self) -> bool:
        """False once the model failed to load or the engine stopped: the orchestrator should restart us."""
        return self.error is None and (self.engine is None or self.engine.failure is None)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def drain_on_sigterm(self, grace_s: float) -> None:
        """On SIGTERM, stop admitting and give running generations ``grace_s`` to finish; the
        server's own handler (stop accepting, wait for open requests) still runs as before."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            logger.info("SIGTERM: no new requests; running ones get %.0f s to finish", grace_s)
            if self.engine is not None:
                threading.Thread(target=self.engine.drain, args=(grace_s,), name="glm4v-drain", daemon=True).start()
            if callable(previous):
                previous(signum, frame)

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread: leave signals to the server
            logger.warning("could not install the SIGTERM handler (not on the main thread)")

    # --- the batch entry point

    async def run_batch(self, items: list[BatchItem]) -> list[BatchOutcome]:
        """Submit items together (they start in the same step when there is room); one outcome each."""
        if self.engine is None:
            return [BatchOutcome(request_id=i.request_id, status=503, error=self.not_ready_message()) for i in items]
        engine_ids = [self._engine_id(item.request_id) for item in items]
        try:
            return await self._run_items(items, engine_ids)
        finally:
            for engine_id in engine_ids:
                if engine_id not in self._claims:  # a client's item, or its caller has left
                    self.release(engine_id)

    def _engine_id(self, client_id: str) -> str:
        """The id an item runs under. One from this process's handlers (``internal_id``) is unique
        already; any other was chosen by a client, who may reuse it (two scripts both counting
        from 0), so it runs under an id of its own and only the outcome carries the client's."""
        return client_id if client_id.startswith(INTERNAL_ID_PREFIX) else f"{client_id}@{uuid.uuid4().hex[:12]}"

    def _claimed(self, request_id: str) -> bool:
        claim = self._claims.get(request_id)
        return claim is not None and not claim.done()

    def _abandoned(self, item: BatchItem) -> bool:
        """An item from this process's own handlers (``internal_id``) whose caller does not wait
        for it: gone since (timed out, disconnected), or never in this process. Its images stay
        with that caller, so it must not run."""
        return _from_this_process(item) and item.request_id not in self._claims

    async def _images_of(self, item: BatchItem, engine_id: str) -> list[CheckedImage]:
        """The images left with ``claim`` by an in-process caller, then those the item carries
        (a client's, base64), decoded off the event loop."""
        claimed = self._claimed_images.get(engine_id, [])  # a client's item runs under a new id: none
        if not item.images_b64:
            return claimed
        return claimed + await anyio.to_thread.run_sync(_decode_base64, item.images_b64, self.limits)

    async def _run_items(self, items: list[BatchItem], engine_ids: list[str]) -> list[BatchOutcome]:
        outcomes: list[BatchOutcome | None] = [None] * len(items)
        requests: list[tuple[int, GenerationRequest]] = []
        for index, (item, engine_id) in enumerate(zip(items, engine_ids, strict=True)):
            if self._abandoned(item):
                outcomes[index] = BatchOutcome(request_id=item.request_id, status=503, error=_CANCELLED)
                continue
            try:
                images = await self._images_of(item, engine_id)
                hit = await self.cached_answer(
                    engine_id,
                    item.params,
                    item.cache,
                    images=[i.data for i in images],
                    prompt=item.prompt,
                    system=item.system,
                )
                if hit is not None:
                    outcomes[index] = _outcome(item.request_id, hit)
                    continue
                requests.append((index, self.to_request(engine_id, images, item)))
            except ImageError as exc:
                outcomes[index] = BatchOutcome(
                    request_id=item.request_id, status=image_error_status(exc), error=str(exc)
                )
        # Submitted in one go, so that they can start in the same step.
        try:
            submitted = self.engine.submit_many([request for _, request in requests])
        except EngineClosedError as exc:
            return [
                o or BatchOutcome(request_id=i.request_id, status=503, error=str(exc))
                for o, i in zip(outcomes, items, strict=True)
            ]
        handles = [
            (index, h) for (index, _), h in zip(requests, submitted, strict=True) if isinstance(h, RequestHandle)
        ]
        for (index, _), refused in zip(requests, submitted, strict=True):
            if isinstance(refused, QueueFullError):
                outcomes[index] = BatchOutcome(request_id=items[index].request_id, status=429, error=str(refused))
        # A client's own items (not an in-process caller's): accounted in their requests, however they end.
        own: set[int] = set()
        for index, handle in handles:
            if not _from_this_process(items[index]):
                own.add(index)
                self.started_for_client(handle, items[index].origin)
        received: set[int] = set()
        try:
            for index, handle in handles:
                if self._claimed(engine_ids[index]):
                    # An in-process caller waits for this one itself: hand it over and move on, so
                    # the batcher is free to pass on the next batch while this one generates.
                    self._claims[engine_ids[index]].set_result(handle)
                    outcomes[index] = BatchOutcome(request_id=items[index].request_id, status=202)
                elif self._abandoned(items[index]):
                    handle.cancel()
                    outcomes[index] = BatchOutcome(request_id=items[index].request_id, status=503, error=_CANCELLED)
                else:  # reported in the item's request: the batcher runs this in a task of its own
                    result = await handle.wait()
                    received.add(index)
                    outcomes[index] = _outcome(items[index].request_id, items[index].origin.run(self.completed, result))
        except asyncio.CancelledError:  # the callers gave up: stop their generations
            for index, handle in handles:
                if index not in own:
                    handle.cancel()
                elif index not in received:
                    handle.abandon()
            raise
        return [o for o in outcomes if o is not None]

    def claim(self, request_id: str, images: list[CheckedImage] | None = None) -> asyncio.Future[RequestHandle]:
        """Announce that this process will wait for ``request_id`` (from ``internal_id``) itself
        (see ``run_batch``), and leave its images here: the batcher's item carries none. Call
        ``release`` when done."""
        future: asyncio.Future[RequestHandle] = asyncio.get_running_loop().create_future()
        self._claims[request_id] = future
        self._claimed_images[request_id] = images or []
        return future

    def release(self, request_id: str) -> None:
        self._claims.pop(request_id, None)
        self._claimed_images.pop(request_id, None)
        self._cache_keys.pop(request_id, None)

    async def result_of(self, outcome: BatchOutcome, claim: asyncio.Future[RequestHandle]) -> BatchOutcome:
        """The final outcome of a batched item: as the batcher answered it, or, when the batcher
        handed it over (202), once its generation is done."""
        if outcome.status != 202:
            return outcome
        handle = await claim
        self.started_for_client(handle, RequestOrigin())  # here, in the caller's request
        return _outcome(outcome.request_id, self.completed(await handle.wait()))

    def completed(self, result: GenerationResult) -> GenerationResult:
        """Report a result a client is about to receive (in the client's request context)."""
        key = self._cache_keys.pop(result.request_id or "", None)
        if key is not None and self.cache is not None and result.finish_reason in ("stop", "length"):
            if isinstance(self.cache, MemoryResultCache):
                self.cache.put(key, result)
            else:  # a network round trip: not on the event loop
                _cache_writer.submit(self.cache.put, key, result)
        if self.on_result is not None:
            self.on_result(result)
        return result

    async def results_of(self, handles: list[RequestHandle]) -> list[GenerationResult]:
        """All their results, each reported (``completed``). A caller that gives up abandons them
        all: those whose results had come in meanwhile reached nobody either."""
        try:
            results = await asyncio.gather(*(handle.wait() for handle in handles))
        except asyncio.CancelledError:
            for handle in handles:
                handle.abandon()
            raise
        return [self.completed(result) for result in results]

    def started_for_client(self, handle: RequestHandle, origin: RequestOrigin) -> None:
        """``handle`` is a generation started for the client of ``origin``: tell ``on_started`` there,
        and should the client leave before its result, report what ran for it there too."""
        if self.on_started is not None:
            origin.run(self.on_started, handle)
        handle.on_abandoned(lambda result: origin.run(self._abandoned_result, result))

    def _abandoned_result(self, result: GenerationResult) -> None:
        self._cache_keys.pop(result.request_id or "", None)  # nothing to store for a client that left
        if self.on_abandoned is not None:
            self.on_abandoned(result)

    async def cached_answer(
        self,
        request_id: str,
        params: SamplingParams,
        use_cache: bool,
        *,
        images: list[bytes],
        prompt: str,
        system: str | None,
        history: list[tuple[str, str, list[bytes]]] | None = None,
    ) -> GenerationResult | None:
        """A stored answer to exactly this request, if caching applies and there is one. On a
        miss the request is remembered, and ``completed`` stores its answer."""
        if self.cache is None or not use_cache or self.engine is None:
            return None
        # As the engine will run it: whether it is deterministic, and its key, depend on the defaults.
        params = params.with_defaults(self.engine.sampling_defaults)
        if not is_deterministic(params):
            return None
        key = cache_key(
            model=self.source.ref,
            revision=revision_of(self.model_path or "", self.source.revision),
            images=images,
            prompt=prompt,
            system=system,
            history=history or [],
            params=params,
        )
        if isinstance(self.cache, MemoryResultCache):
            hit = self.cache.get(key)
        else:  # a network round trip: not on the event loop
            hit = await anyio.to_thread.run_sync(self.cache.get, key)
        if self.on_cache is not None:
            self.on_cache(hit is not None)
        if hit is None:
            self._cache_keys[request_id] = key
            return None
        return hit.model_copy(update={"cached": True, "request_id": request_id})

    def to_request(self, request_id: str, images: list[CheckedImage], item: BatchItem) -> GenerationRequest:
        return GenerationRequest(
            prompt=item.prompt,
            images=[i.image for i in images],
            system=item.system,
            params=item.params,
            request_id=request_id,
        )

    def submit_stream(self, request_id: str, images: list[CheckedImage], item: BatchItem) -> RequestHandle:
        """Start a streamed request (no batcher: it joins the running batch directly)."""
        if self.engine is None:
            raise RuntimeError(self.not_ready_message())
        return self.open_stream(self.to_request(request_id, images, item))

    def open_stream(self, request: GenerationRequest) -> RequestHandle:
        """Submit a streamed request within the open-streams limit (QueueFullError past it)."""
        with self._streams_lock:
            if self._open_streams >= self.settings.max_streams:
                raise QueueFullError(
                    f"{self._open_streams} streams are open (the limit is {self.settings.max_streams})"
                )
            handle = self.engine.submit(request, stream=True)
            self._open_streams += 1
        handle.add_done_callback(self._stream_closed)
        self.started_for_client(handle, RequestOrigin())
        return handle

    def submit_all(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Submit requests that start together or not at all (``Engine.submit_all``), for this client."""
        handles = self.engine.submit_all(requests)
        for handle in handles:
            self.started_for_client(handle, RequestOrigin())
        return handles

    def _stream_closed(self, _: RequestHandle) -> None:
        with self._streams_lock:
            self._open_streams -= 1

    def cancel(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.cancel(request_id)

    # --- reporting

    def not_ready_message(self) -> str:
        if self.error:
            return "the model failed to load; see the server log"
        if not self.alive:
            return "the engine stopped after an internal error; see the server log (the server needs a restart)"
        return "the model is still loading; retry shortly"

    def health(self) -> HealthResponse:
        engine = self.engine
        status = "unhealthy" if not self.alive else ("healthy" if engine is not None else "loading")
        return HealthResponse(
            status=status,
            model_loaded=engine is not None,
            device=str(engine.loaded.device) if engine else None,
            queue_depth=engine.queue_depth if engine else 0,
            running=engine.running if engine else 0,
            timestamp=now_iso(),
            error=self.not_ready_message() if not self.alive else None,
        )

    def model_info(self) -> dict[str, Any]:
        if self.engine is None:
            raise RuntimeError("model not loaded")
        loaded = self.engine.loaded
        config = loaded.model.config
        text, vision = config.get_text_config(), config.vision_config
        return {
            "model_name": self.source.ref,
            "source": self.source.kind,
            "revision": revision_of(self.model_path or "", self.source.revision),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "parameter_count": loaded.parameter_count,
            "max_context": loaded.max_context,
            "architecture": type(loaded.model).__name__,
            "decode": {**self.engine.runner.decode_path(), "overlapped_steps": self.engine.scheduler.overlap_steps},
            "prefill": {"chunk_tokens": self.engine.runner.prefill_chunk_tokens},  # 0: whole prompts
            # what a request's unset sampling fields become (GLM4V_SAMPLING_DEFAULTS)
            "sampling_defaults": self.engine.sampling_defaults.model_dump(),
            "model_config": {
                "text": {
                    "num_hidden_layers": text.num_hidden_layers,
                    "hidden_size": text.hidden_size,
                    "num_attention_heads": text.num_attention_heads,
                    "num_key_value_heads": text.num_key_value_heads,
                    "vocab_size": text.vocab_size,
                },
                "vision": {
                    "depth": vision.depth,
                    "hidden_size": vision.hidden_size,
                    "patch_size": vision.patch_size,
                    "spatial_merge_size": vision.spatial_merge_size,
                },
            },
            "processor_info": type(loaded.processor).__name__,
            "limits": {
                "max_images_per_request": self.settings.max_images_per_request,
                "max_image_bytes": self.settings.max_image_bytes,
                "max_image_pixels": self.settings.max_image_pixels,
                "max_batch_items": self.settings.max_batch_items,
                "default_max_new_tokens": self.settings.default_max_new_tokens,
            },
        }


def _decode_base64(encoded_images: list[str], limits: ImageLimits) -> list[CheckedImage]:
    images = []
    for number, encoded in enumerate(encoded_images, start=1):
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("corrupt", f"image {number} is not valid base64") from None
        try:
            images.append(check_image(data, limits))
        except ImageError as exc:
            raise ImageError(exc.reason, f"image {number}: {exc.message}") from None
    return images


_CANCELLED = "the request was cancelled before it ran"
INTERNAL_ID_PREFIX = "glm4v-internal-"


def _from_this_process(item: BatchItem) -> bool:
    return item.request_id.startswith(INTERNAL_ID_PREFIX)


def internal_id() -> str:
    """An id for an item this process's handlers send through the batcher: nobody outside can
    guess it (/v1/batch/generate is open to clients, and an item there under the same id would
    be taken for this one), and its prefix tells ``run_batch`` that its images stay here."""
    return INTERNAL_ID_PREFIX + secrets.token_hex(16)


def as_sent(outcome: BatchOutcome, request_id: str) -> BatchOutcome:
    """``outcome`` under the id its client gave (items run under ids of the server's)."""
    if outcome.request_id == request_id and (outcome.result is None or outcome.result.request_id == request_id):
        return outcome
    result = outcome.result and outcome.result.model_copy(update={"request_id": request_id})
    return outcome.model_copy(update={"request_id": request_id, "result": result})


def _outcome(request_id: str, result: GenerationResult) -> BatchOutcome:
    """The outcome the client sees, under the id the client gave."""
    if result.finish_reason == "cancelled" and not result.text:
        return BatchOutcome(request_id=request_id, status=503, error=_CANCELLED)
    if result.finish_reason != "error":
        return as_sent(BatchOutcome(request_id=request_id, status=200, result=result), request_id)
    status = 400 if result.error_type == "invalid_request" else 500
    return BatchOutcome(request_id=request_id, status=status, error=result.error)
