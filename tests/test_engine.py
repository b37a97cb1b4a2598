"""The engine: one batch that equals solo runs, per-row parameters, errors that stay in their row."""

from __future__ import annotations

import threading

import pytest
from conftest import make_image

from glm4v_bento.engine import GenerationRequest, SamplingParams, Turn


def greedy(max_new_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **{"temperature": 0.0, **extra})


def mixed_requests() -> list[GenerationRequest]:
    return [
        GenerationRequest("Describe this image.", images=[make_image(64, 48)], params=greedy(24)),
        GenerationRequest("Compare them.", images=[make_image(112, 112), make_image(30, 90)], params=greedy(10)),
        GenerationRequest("A question with no image at all.", params=greedy(31)),
        GenerationRequest("small", images=[make_image(28, 28, (0, 0, 255))], params=greedy(17)),
        GenerationRequest("tall picture", images=[make_image(40, 200, (0, 200, 0))], params=greedy(5)),
        GenerationRequest(
            "penalised",
            images=[make_image(90, 60)],
            system="You are terse.",
            params=greedy(20, repetition_penalty=1.3),
        ),
        GenerationRequest(
            "sampled",
            images=[make_image(70, 70)],
            params=greedy(12, temperature=0.9, top_p=0.8, top_k=40, seed=7),
        ),
        GenerationRequest(
            "follow-up",
            history=[
                Turn("user", "first", images=[make_image(56, 56)]),
                Turn("assistant", "<answer>ok</answer>"),
            ],
            params=greedy(9),
        ),
    ]


@pytest.fixture(scope="module")
def solo_results(engine):
    return [engine.generate([request])[0] for request in mixed_requests()]


def test_batch_equals_solo_for_greedy_rows(engine, solo_results):
    batch = engine.generate(mixed_requests())
    for request, alone, together in zip(mixed_requests(), solo_results, batch, strict=True):
        if request.params.greedy:
            assert together.text == alone.text, request.prompt
            assert together.usage == alone.usage


def test_each_row_keeps_its_own_length(engine, solo_results):
    for request, result in zip(mixed_requests(), solo_results, strict=True):
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == request.params.max_new_tokens
        assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_batch_order_does_not_change_greedy_output(engine, solo_results):
    requests = mixed_requests()[::-1]
    reversed_results = engine.generate(requests)
    for request, result, alone in zip(requests, reversed_results, solo_results[::-1], strict=True):
        if request.params.greedy:
            assert result.text == alone.text


def test_seeded_sampling_is_reproducible(engine):
    request = GenerationRequest("roll", params=greedy(16, temperature=1.0, seed=1234))
    first, second = engine.generate([request])[0], engine.generate([request])[0]
    assert first.text == second.text
    other = engine.generate([GenerationRequest("roll", params=greedy(16, temperature=1.0, seed=99))])[0]
    assert other.text != first.text


def test_prompt_tokens_include_image_tokens(engine, loaded_model):
    image = make_image(112, 112)
    with_image = engine.generate([GenerationRequest("x", images=[image], params=greedy(1))])[0]
    without = engine.generate([GenerationRequest("x", params=greedy(1))])[0]
    # 112x112 -> 8x8 patches -> 16 merged tokens, plus begin/end-of-image markers.
    assert with_image.usage.prompt_tokens - without.usage.prompt_tokens == 16 + 2


def test_stop_string_ends_the_row_and_is_not_returned(engine):
    request = GenerationRequest("Describe this image.", images=[make_image(64, 48)], params=greedy(24))
    full = engine.generate([request])[0].text
    stop = full[6:9]
    assert stop and full.find(stop) >= 1
    request.params = greedy(24, stop=[stop])
    stopped, neighbour = engine.generate([request, GenerationRequest("other", params=greedy(20))])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.find(stop)]
    assert neighbour.finish_reason == "length" and neighbour.usage.completion_tokens == 20


def test_result_carries_the_parsed_parts_and_timings(engine):
    from glm4v_bento.engine import parse_output

    result = engine.generate([GenerationRequest("x", params=greedy(8))])[0]
    parsed = parse_output(result.text)
    assert (result.thinking, result.answer, result.box) == (parsed.thinking, parsed.answer, parsed.box)
    assert result.timings.total_s >= result.timings.prefill_s >= 0
    assert result.timings.queue_s >= 0


def test_a_bad_request_fails_alone(engine, loaded_model):
    too_long = GenerationRequest("x", params=SamplingParams(max_new_tokens=loaded_model.max_context))
    too_many = GenerationRequest("x", images=[make_image(28, 28)] * 9, params=greedy(4))
    good = GenerationRequest("fine", params=greedy(6))
    results = engine.generate([too_long, good, too_many])
    assert [r.finish_reason for r in results] == ["error", "length", "error"]
    assert "context" in results[0].error and str(loaded_model.max_context) in results[0].error
    assert "9 images" in results[2].error
    assert results[1].usage.completion_tokens == 6


def test_default_max_new_tokens_fits_the_context(engine):
    result = engine.generate([GenerationRequest("x", params=SamplingParams(ignore_eos=True))])[0]
    assert result.usage.completion_tokens == engine.default_max_new_tokens


def test_concurrent_callers_never_share_the_model(engine, loaded_model, solo_results, monkeypatch):
    model = loaded_model.model
    state = {"active": 0, "max_active": 0}
    guard = threading.Lock()
    original_forward = model.forward

    def counting_forward(*args, **kwargs):
        with guard:
            state["active"] += 1
            state["max_active"] = max(state["max_active"], state["active"])
        try:
            return original_forward(*args, **kwargs)
        finally:
            with guard:
                state["active"] -= 1

    monkeypatch.setattr(model, "forward", counting_forward)
    requests = mixed_requests()
    outputs: dict[int, str] = {}

    def call(i: int) -> None:
        outputs[i] = engine.generate([requests[i]])[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert state["max_active"] == 1
    for i, request in enumerate(requests):
        if request.params.greedy:
            assert outputs[i] == solo_results[i].text


async def _generate_async(engine, request):
    return await engine.generate_async([request])


def test_async_api(engine, solo_results):
    import asyncio

    result = asyncio.run(_generate_async(engine, mixed_requests()[0]))
    assert result[0].text == solo_results[0].text


def test_a_row_that_breaks_the_model_fails_alone(engine, loaded_model, monkeypatch):
    """An unexpected failure inside the model costs only the request that causes it."""
    poison = loaded_model.tokenizer.encode("POISON", add_special_tokens=False)
    original_forward = loaded_model.model.forward

    marker = loaded_model.model.get_input_embeddings().weight[poison[0]]

    def fragile_forward(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")  # the prefill step carries the prompt embeddings
        if embeds is not None and bool((embeds == marker).all(-1).any()):
            raise RuntimeError("simulated kernel failure")
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(loaded_model.model, "forward", fragile_forward)
    good = GenerationRequest("fine", params=greedy(5))
    bad = GenerationRequest("POISON", params=greedy(5))
    results = engine.generate([good, bad, good])
    assert [r.finish_reason for r in results] == ["length", "error", "length"]
    assert results[1].error_type == "internal"
    assert "simulated" not in results[1].error  # no internals leak to clients
    alone = engine.generate([bad])[0]
    assert alone.finish_reason == "error" and alone.error_type == "internal"


def test_client_errors_are_marked_as_such(engine):
    result = engine.generate([GenerationRequest("x", images=[make_image(28, 28)] * 9)])[0]
    assert result.error_type == "invalid_request"


def test_offloading_to_disk_gives_the_same_tokens(tiny_model_dir, tmp_path, solo_results):
    """The tutorial's memory options for small GPUs: device_map + max_memory + offload_folder."""
    from glm4v_bento.config import Settings
    from glm4v_bento.engine import Engine

    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        device_map="auto",
        max_memory={"cpu": "300KB"},  # less than the model: the rest goes to disk
        offload_folder=str(tmp_path / "offload"),
    )
    offloaded = Engine.from_settings(settings)
    try:
        assert "disk" in set(offloaded.loaded.model.hf_device_map.values())  # some weights live on disk
        result = offloaded.generate([mixed_requests()[0]])[0]
    finally:
        offloaded.close()
    assert result.text == solo_results[0].text


def test_a_model_spread_by_accelerate_decodes_through_each_layers_own_forward(tiny_model_dir, solo_results):
    """Spread over several GPUs, accelerate hooks each decoder layer, and the hook brings the
    layer's inputs to its device: every decode step must go through those hooks."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from glm4v_bento.engine import Engine, load_model

    class CountingHook(ModelHook):  # where accelerate's AlignDevicesHook would move the inputs
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    loaded = load_model(str(tiny_model_dir), device="cpu")
    layers = loaded.model.model.language_model.layers
    for layer in layers:
        add_hook_to_module(layer, CountingHook())
    engine = Engine(loaded)
    try:
        result = engine.generate([mixed_requests()[0]])[0]
    finally:
        engine.close()
    assert result.text == solo_results[0].text
    decode_steps = result.usage.completion_tokens - 1  # the first token comes from the prefill
    assert CountingHook.calls == len(layers) * (1 + decode_steps)
