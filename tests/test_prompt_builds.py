"""Prompts with large images are built on a thread of their own: running streams never wait for
another request's photos to be prepared; small prompts are still built at admission; a group
submitted to an idle engine still starts together."""

from __future__ import annotations

import threading

import pytest
from test_scheduler import request, wait_until

from glm4v_bento.engine import Engine
from glm4v_bento.engine.prompt import PromptBuilder
from glm4v_bento.engine.prompt_builds import HEAVY_PIXELS

build = PromptBuilder.build
LARGE = 600  # a side: 600 x 600 pixels is a large image
SMALL = 56
assert LARGE * LARGE >= HEAVY_PIXELS > SMALL * SMALL * 8


@pytest.fixture
def make_engine(loaded_model):
    """Engines made after the test has patched how prompts are built (each takes it at start)."""
    engines = []

    def make() -> Engine:
        engines.append(Engine(loaded_model, default_max_new_tokens=32))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def held(monkeypatch):
    """Builds of prompts that say "held" wait until released; each build is recorded with the
    thread it ran on."""
    started, release, built = threading.Event(), threading.Event(), {}

    def held_build(self, generation_request):
        built[generation_request.prompt] = threading.current_thread().name
        if generation_request.prompt == "held":
            started.set()
            assert release.wait(60), "never released"
        return build(self, generation_request)

    monkeypatch.setattr(PromptBuilder, "build", held_build)
    yield started, release, built
    release.set()


def test_running_streams_keep_decoding_while_a_large_image_prompt_is_built(make_engine, held):
    started, release, _ = held
    engine = make_engine()
    steps = []
    engine.scheduler.on_step = lambda running, waiting: steps.append(running)
    stream = engine.submit(request("a long story", 3000))
    wait_until(lambda: engine.running == 1)
    arriving = engine.submit(request("held", 5, image_size=LARGE))
    assert started.wait(30)
    before = len(steps)
    wait_until(lambda: len(steps) >= before + 50)  # the stream decodes while that prompt is held
    assert not arriving.done and engine.queue_depth == 1
    quick = engine.submit(request("a small one behind it", 5, image_size=SMALL))
    assert quick.result(timeout=60).usage.completion_tokens == 5  # it need not wait its turn
    release.set()
    result = arriving.result(timeout=60)
    assert result.finish_reason == "length" and result.usage.completion_tokens == 5
    assert not stream.done
    stream.cancel()


def test_small_prompts_are_built_at_admission_large_ones_on_the_prompt_thread(make_engine, held):
    _, release, built = held
    release.set()
    engine = make_engine()
    engine.generate([request("text", 3), request("small", 3, image_size=SMALL), request("large", 3, image_size=LARGE)])
    assert built["text"] == built["small"] == "glm4v-scheduler"
    assert built["large"].startswith("glm4v-prompts")


def test_an_idle_engine_starts_requests_submitted_together_as_one_group(make_engine, held, monkeypatch):
    _, release, _ = held
    release.set()
    engine = make_engine()
    groups = []
    begin = engine.runner.begin_prefill
    monkeypatch.setattr(engine.runner, "begin_prefill", lambda prompts: groups.append(len(prompts)) or begin(prompts))
    sizes = [None, LARGE, SMALL, LARGE]
    handles = engine.submit_all([request(f"question {i}", 3, image_size=size) for i, size in enumerate(sizes)])
    assert all(handle.result(timeout=60).usage.completion_tokens == 3 for handle in handles)
    assert groups == [4]


@pytest.mark.parametrize("side", [SMALL, LARGE], ids=["built at admission", "built on the prompt thread"])
def test_a_prompt_that_fails_to_build_fails_its_request_alone(make_engine, monkeypatch, side):
    def broken_build(self, generation_request):
        if generation_request.prompt == "broken":
            raise RuntimeError("a bug in image preparation")
        return build(self, generation_request)

    monkeypatch.setattr(PromptBuilder, "build", broken_build)
    engine = make_engine()
    stream = engine.submit(request("a long story", 3000))
    wait_until(lambda: engine.running == 1)
    broken = engine.submit(request("broken", 5, image_size=side))
    fine = engine.submit(request("fine", 5, image_size=side))
    failed = broken.result(timeout=60)
    assert failed.finish_reason == "error" and failed.error_type == "internal"
    assert "RuntimeError" in failed.error and "a bug" not in failed.error  # the type, not the internals
    assert fine.result(timeout=60).usage.completion_tokens == 5
    assert not stream.done
    stream.cancel()
    assert stream.result(timeout=60).finish_reason == "cancelled"


def test_a_request_cancelled_before_its_prompt_is_built_never_has_it_built(make_engine, held):
    started, release, built = held
    engine = make_engine()
    stream = engine.submit(request("a long story", 3000))
    wait_until(lambda: engine.running == 1)
    first = engine.submit(request("held", 3, image_size=LARGE))
    assert started.wait(30)
    second = engine.submit(request("then this", 3, image_size=LARGE))  # its build waits behind the held one
    second.cancel()
    assert second.result(timeout=60).finish_reason == "cancelled"
    release.set()
    assert first.result(timeout=60).usage.completion_tokens == 3
    stream.cancel()
    stream.result(timeout=60)
    assert "then this" not in built
