"""ModelHost: background loading, readiness, per-item batch outcomes (no HTTP)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import pytest
from conftest import encode, host_for, make_image

from glm4v_bento.engine import GenerationRequest, SamplingParams
from glm4v_bento.images import check_image
from glm4v_bento.rate_limit import current_client
from glm4v_bento.result_cache import MemoryResultCache
from glm4v_bento.schemas import BatchItem
from glm4v_bento.serving import ModelHost, as_sent, internal_id


@pytest.fixture(scope="module")
def host(tiny_model_dir):
    h = host_for(str(tiny_model_dir), max_image_bytes=50_000)
    assert h.wait_ready(60), h.error
    yield h
    h.close()


def item(request_id: str, images: list[bytes], tokens: int = 4) -> BatchItem:
    return BatchItem(
        request_id=request_id,
        images_b64=[base64.b64encode(i).decode() for i in images],
        prompt="describe",
        params=SamplingParams(max_new_tokens=tokens, ignore_eos=True),
    )


def test_each_item_gets_its_own_outcome(host):
    good = encode(make_image(40, 40))
    items = [
        item("a", [good]),
        item("b", [b"junk"]),
        item("c", [encode(make_image(300, 300), "BMP")]),  # over the 50 kB limit
        item("d", [good, good], tokens=6),
        BatchItem(request_id="e", images_b64=["***not base64***"]),
        item("f", [good] * 9),  # over the images-per-request limit
    ]
    outcomes = asyncio.run(host.run_batch(items))
    assert [o.request_id for o in outcomes] == ["a", "b", "c", "d", "e", "f"]
    assert [o.status for o in outcomes] == [200, 400, 413, 200, 400, 400]
    assert outcomes[3].result.usage.completion_tokens == 6
    assert "base64" in outcomes[4].error
    assert "9 images" in outcomes[5].error


def test_health_and_info_once_loaded(host):
    health = host.health()
    assert (health.status, health.model_loaded, health.device) == ("healthy", True, "cpu")
    info = host.model_info()
    assert info["source"] == "local" and info["max_context"] == 8192
    assert info["prefill"] == {"chunk_tokens": 0}  # the CPU prefills whole prompts


def test_a_model_that_cannot_load_makes_the_host_unhealthy(tmp_path):
    broken = host_for(str(tmp_path))  # an empty directory
    broken._loader.join(60)
    assert not broken.ready and not broken.alive
    assert broken.health().status == "unhealthy"
    outcomes = asyncio.run(broken.run_batch([item("x", [])]))
    assert outcomes[0].status == 503 and "failed to load" in outcomes[0].error


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's own error
def test_an_engine_that_stopped_on_a_bug_makes_the_host_not_alive_so_it_is_restarted(tiny_model_dir):
    """Before, /livez and /readyz stayed green while every request got a 503, so nothing restarted it."""
    broken = host_for(str(tiny_model_dir))
    assert broken.wait_ready(60), broken.error
    assert broken.alive and broken.health().status == "healthy"

    def a_bug() -> None:
        raise RuntimeError("a bug in the scheduler's loop")

    broken.engine.scheduler._drop_cancelled = a_bug  # runs in the loop at every turn
    asyncio.run(broken.run_batch([item("x", [])]))
    broken.engine.scheduler._thread.join(10)
    assert not broken.alive and not broken.ready
    health = broken.health()
    assert health.status == "unhealthy" and "needs a restart" in health.error
    [outcome] = asyncio.run(broken.run_batch([item("y", [])]))
    assert outcome.status == 503 and "needs a restart" in outcome.error
    broken.close()


def test_a_failing_metrics_callback_does_not_stop_the_serving(tiny_model_dir, caplog):
    host = host_for(str(tiny_model_dir))
    assert host.wait_ready(60), host.error

    def failing_metrics(running: int, waiting: int, decode_path) -> None:
        raise RuntimeError("a bug in a metrics callback")

    host.on_step = failing_metrics  # called after every step
    for name in ("x", "y"):
        [outcome] = asyncio.run(host.run_batch([item(name, [])]))
        assert outcome.status == 200
    assert host.alive
    assert caplog.text.count("the step callback failed") == 1
    host.close()


def test_where_decode_is_compiled_the_warm_up_also_decodes_over_a_long_context(tiny_model_dir):
    """So that the compilations decoding needs (one row, batches, a long context) happen before
    ready, not in a request."""
    compiled = host_for(str(tiny_model_dir), compile_decode=True)
    try:
        assert compiled.wait_ready(300), compiled.error
        runner = compiled.engine.runner
        assert runner.compiled.enabled and runner.compiled.compilations == 2  # one row, and batches
        assert runner.cache.column_capacity > 1024  # its steps ran over the long prompt
    finally:
        compiled.close()


def test_a_long_warm_up_that_fails_is_only_a_warning(tiny_model_dir, monkeypatch, caplog):
    import glm4v_bento.serving

    monkeypatch.setattr(glm4v_bento.serving, "LONG_WARMUP_WORDS", 100_000)  # past the tiny model's context
    compiled = host_for(str(tiny_model_dir), compile_decode=True)
    try:
        assert compiled.wait_ready(300), compiled.error
        assert "the long-context warm-up failed" in caplog.text
    finally:
        compiled.close()


def test_open_streams_are_limited(tiny_model_dir):
    from glm4v_bento.engine import GenerationRequest, QueueFullError

    streams = host_for(str(tiny_model_dir), max_streams=2)
    assert streams.wait_ready(60), streams.error
    try:
        long = GenerationRequest("long", params=SamplingParams(max_new_tokens=6000, ignore_eos=True))
        first, second = streams.open_stream(long), streams.open_stream(long)
        with pytest.raises(QueueFullError, match="the limit is 2"):
            streams.open_stream(long)
        first.cancel()
        first.result(timeout=30)
        third = streams.open_stream(long)  # a closed stream frees its place
        for handle in (second, third):
            handle.cancel()
            handle.result(timeout=30)
    finally:
        streams.close()


def text_item(request_id: str, prompt: str, cache: bool = True) -> BatchItem:
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    return BatchItem(request_id=request_id, prompt=prompt, params=params, cache=cache)


def test_items_that_share_a_client_id_keep_their_own_answers(host):
    """Ids on /v1/batch/generate are the client's: two items may share one (two scripts both
    numbering from 0). Each still gets, and caches, the answer to its own prompt."""
    host.cache = MemoryResultCache(10_000_000)
    try:
        fresh = asyncio.run(host.run_batch([text_item("0", "first", cache=False), text_item("1", "second", False)]))
        first, second = (o.result.text for o in fresh)
        assert first != second  # otherwise this test could not tell the answers apart

        # Same id in one batch, then the same id from two batches at once.
        shared = asyncio.run(host.run_batch([text_item("0", "first"), text_item("0", "second")]))
        assert [(o.request_id, o.status, o.result.text) for o in shared] == [("0", 200, first), ("0", 200, second)]

        async def concurrently():
            return await asyncio.gather(
                host.run_batch([text_item("7", "second")]), host.run_batch([text_item("7", "first")])
            )

        host.cache = MemoryResultCache(10_000_000)
        concurrent = [o for [o] in asyncio.run(concurrently())]
        assert [(o.request_id, o.result.text) for o in concurrent] == [("7", second), ("7", first)]

        # What was stored under each prompt is that prompt's answer.
        cached = asyncio.run(host.run_batch([text_item("x", "first"), text_item("y", "second")]))
        assert [(o.request_id, o.result.cached, o.result.text) for o in cached] == [
            ("x", True, first),
            ("y", True, second),
        ]
        assert [o.result.request_id for o in cached + concurrent] == ["x", "y", "7", "7"]
    finally:
        host.cache = None


def test_an_in_process_caller_hands_its_decoded_images_to_the_batch(host):
    """The service's own handlers decode an upload once, leave it with ``claim``, and send the
    batcher an item without images; the generation still sees the image."""
    image = check_image(encode(make_image(56, 56)), host.limits)

    async def through_claim(images):
        secret = internal_id()
        claim = host.claim(secret, images)
        try:
            [outcome] = await host.run_batch([text_item(secret, "describe", cache=False)])
            assert outcome.status == 202  # handed over: the caller waits for it itself
            final = await host.result_of(outcome, claim)
            return as_sent(final, "shown-to-client")
        finally:
            host.release(secret)

    with_image, text_only = asyncio.run(through_claim([image])), asyncio.run(through_claim([]))
    assert with_image.status == text_only.status == 200
    assert with_image.request_id == with_image.result.request_id == "shown-to-client"
    assert with_image.result.usage.prompt_tokens > text_only.result.usage.prompt_tokens  # the image's tokens
    assert not host._claims and not host._claimed_images  # released


class CallerLeavesDuringLookup:
    """A remote result cache (looked up off the event loop) during whose lookup the in-process
    caller of ``request_id`` times out and releases its claim."""

    def __init__(self, host: ModelHost, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.host, self.request_id, self.loop = host, request_id, loop

    def get(self, key: str):
        left = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (self.host.release(self.request_id), left.set()))
        assert left.wait(5)
        return None

    def put(self, key: str, result) -> None:
        raise AssertionError("nothing should have run, so nothing should be stored")


def test_an_item_whose_caller_left_meanwhile_does_not_run(host):
    gone = internal_id()

    async def caller_leaves_during_the_lookup():
        host.cache = CallerLeavesDuringLookup(host, gone, asyncio.get_running_loop())
        host.claim(gone, [check_image(encode(make_image(40, 40)), host.limits)])
        return await host.run_batch([text_item(gone, "describe")])

    try:
        [outcome] = asyncio.run(caller_leaves_during_the_lookup())
    finally:
        host.cache = None
    assert outcome.status == 503 and "cancelled" in outcome.error  # not run, and not without its image
    assert gone not in host._cache_keys  # nothing left behind


def test_an_item_from_a_handler_that_is_not_waiting_here_does_not_run_without_its_images(host):
    """Its images stay with the handler that sent it: run here, it would answer a different question."""
    [outcome] = asyncio.run(host.run_batch([text_item(internal_id(), "describe")]))
    assert outcome.status == 503 and "cancelled" in outcome.error


def test_client_images_are_decoded_off_the_event_loop(host, monkeypatch):
    """A large upload takes tens of ms to decode: on the event loop it would stall every other request."""
    decoded_on: list[str] = []

    def recording(data, limits):
        decoded_on.append(threading.current_thread().name)
        return check_image(data, limits)

    monkeypatch.setattr("glm4v_bento.serving.check_image", recording)

    async def run():
        return threading.current_thread().name, await host.run_batch([item("b64", [encode(make_image(40, 40))])])

    loop_thread, [outcome] = asyncio.run(run())
    assert outcome.status == 200
    assert decoded_on and loop_thread not in decoded_on


def test_several_choices_start_together_or_not_at_all(tiny_model_dir):
    """/v1/chat/completions with n: when the queue has room for only some of the choices, none
    runs (429), and the ones already queued are withdrawn."""
    from glm4v_bento.engine import GenerationRequest
    from glm4v_bento.openai_api import OpenAIError, _choices, _submit

    host = host_for(str(tiny_model_dir), max_queue=2)
    try:
        assert host.wait_ready(60), host.error
        params = SamplingParams(max_new_tokens=8000, ignore_eos=True)  # would run for seconds
        choices = _choices(GenerationRequest("x", params=params, request_id="c"), 3)
        assert [c.request_id for c in choices] == ["c-0", "c-1", "c-2"]
        with pytest.raises(OpenAIError) as refused:
            _submit(host, choices, stream=False)
        assert refused.value.status == 429
        deadline = time.monotonic() + 1.5
        while host.engine.running or host.engine.queue_depth:  # the two queued choices were withdrawn
            assert time.monotonic() < deadline, "choices of a refused request kept running"
            time.sleep(0.01)
    finally:
        host.close()


def test_a_clients_batch_items_are_reported_in_the_requests_they_came_in(host):
    """BentoML's adaptive batcher runs a batch in a task of its own (whose context is that of
    whichever request started the batcher): each result is charged to its own client."""
    reported = []
    host.on_result = lambda result: reported.append((current_client.get(), result.request_id.split("@")[0]))
    try:
        items = []
        for client in ("alice", "bob"):
            token = current_client.set(client)
            items.append(item(f"from-{client}", [encode(make_image(40, 40))]))  # parsed in the client's request
            current_client.reset(token)

        async def in_the_batchers_task():
            current_client.set("whoever-came-first")
            return await host.run_batch(items)

        outcomes = asyncio.run(in_the_batchers_task())
    finally:
        host.on_result = None
    assert [o.status for o in outcomes] == [200, 200]
    assert sorted(reported) == [("alice", "from-alice"), ("bob", "from-bob")]


def test_what_ran_for_a_client_that_left_its_stream_is_reported_in_its_request(host):
    told = []
    host.on_abandoned = lambda result: told.append((current_client.get(), result))
    try:

        async def leave_early() -> int:
            current_client.set("carol")
            params = SamplingParams(max_new_tokens=5000, ignore_eos=True)
            handle = host.open_stream(GenerationRequest("long", params=params))
            seen = 0
            async for _ in handle.events():
                seen += 1
                if seen == 3:
                    return seen  # the client went away
            return seen

        seen = asyncio.run(leave_early())
        deadline = time.monotonic() + 30
        while not told:
            assert time.monotonic() < deadline, "the abandoned stream was never reported"
            time.sleep(0.01)
    finally:
        host.on_abandoned = None
    [(client, result)] = told
    assert client == "carol" and result.finish_reason == "cancelled"
    assert seen <= result.usage.completion_tokens < 5000


def test_a_caller_that_gives_up_on_several_choices_has_each_accounted_once(host):
    """One choice had finished when the caller gave up (its result reached nobody), one was still running."""
    told, had = [], []
    host.on_abandoned, host.on_result = told.append, had.append
    try:

        async def give_up():
            short = GenerationRequest("short", params=SamplingParams(max_new_tokens=2, ignore_eos=True))
            long = GenerationRequest("long", params=SamplingParams(max_new_tokens=5000, ignore_eos=True))
            handles = host.submit_all([short, long])
            waiting = asyncio.ensure_future(host.results_of(handles))
            while not handles[0].done:
                await asyncio.sleep(0.01)
            waiting.cancel()  # the client left
            with pytest.raises(asyncio.CancelledError):
                await waiting

        asyncio.run(give_up())
        deadline = time.monotonic() + 30
        while len(told) < 2:
            assert time.monotonic() < deadline, f"only {len(told)} of 2 reported"
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        host.on_abandoned = host.on_result = None
    assert sorted(result.finish_reason for result in told) == ["cancelled", "length"] and had == []
