"""The CUDA-only decode paths on a real GPU: CUDA graphs (real capture, real memory pools) and
torch.compile on Triton. Skipped without a CUDA device; `bench/gpu_session.sh` runs it first.

On the CPU these paths run through stand-ins (tests/test_batching_soak.py); this file is what
catches what only PyTorch's CUDA allocator and graph capture do."""

from __future__ import annotations

import pytest
import torch

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, compiled_step
from glm4v_bento.engine.compiled_step import CompiledStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model(tiny_model_dir):
    from glm4v_bento.engine import load_model

    return load_model(str(tiny_model_dir), device="cuda", dtype="float32")  # greedy answers comparable exactly


def requests(count: int) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    return [GenerationRequest(f"request {i}: " + "tell me more " * (3 * i), params=params) for i in range(count)]


def eager_answers(cuda_model) -> list[str]:
    """Each of requests(8) alone, eager, without graphs: the answers the fast paths must give."""
    eager = Engine(cuda_model, cuda_graphs=False, compile_decode=False)
    try:
        return [eager.generate([request])[0].text for request in requests(8)]
    finally:
        eager.close()


@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "compiled+graphs"])
def test_graphs_are_captured_again_after_the_cache_grows(cuda_model, compiled):
    """One row, then eight at once: the cache reallocates, every graph is dropped and captured
    again in a new memory pool. Graphs must stay on, and each answer be its eager answer."""
    expected = eager_answers(cuda_model)

    engine = Engine(cuda_model, cuda_graphs=True, compile_decode=compiled)
    try:
        first = engine.generate(requests(1))[0].text
        generation = engine.runner.cache.generation
        batch = [result.text for result in engine.generate(requests(8))]
        path = engine.runner.decode_path()
    finally:
        engine.close()

    assert engine.runner.cache.generation > generation  # the buffers did move under the graphs
    assert path["cuda_graphs"], "graph capture failed or disagreed after the cache grew (see the log)"
    assert path["cuda_graphs_captured"] >= 1
    assert path["compiled"] == compiled
    assert [first, *batch] == [expected[0], *expected]


def test_one_row_decodes_over_many_context_lengths_on_one_compilation(cuda_model, caplog):
    """Without graphs each step runs at its own number of columns. On an H200 a one-row step
    compiled at 207 columns was compiled again at 208 (and one compiled at 1791 again at 256):
    SDPA's check of the mask's alignment. Steps now attend over multiples of 16 columns."""
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    engine = Engine(cuda_model, cuda_graphs=False, compile_decode=True)
    try:
        engine.generate([GenerationRequest("tell me more " * 5, params=params)])
        compiled = engine.runner.compiled
    finally:
        engine.close()
    assert compiled is not None and compiled.enabled
    assert compiled.compilations == 1, "compiled again (see the log)"
    assert "compiled again" not in caplog.text


def test_overlapped_steps_give_the_answers_of_steps_waited_for(cuda_model):
    """Each step launched before the tokens of the one before are read back (pinned memory, an
    event per step): the same greedy answers as the steps the host waits for. Unset, the
    setting overlaps steps for a model on one GPU."""
    answers = []
    for overlap in (False, None):
        engine = Engine(cuda_model, cuda_graphs=True, compile_decode=False, overlap_steps=overlap)
        try:
            assert engine.scheduler.overlap_steps is (overlap is None)
            answers.append([result.text for result in engine.generate(requests(8))])
        finally:
            engine.close()
    assert answers[1] == answers[0]


def assert_compiled_with_graphs_answers_as_eager(cuda_model, **engine_options) -> CompiledStep:
    """One row, then eight rows, compiled on Triton and replayed from graphs: each answer its
    eager one, and the compiled steps still on (a compiled step that disagrees with eager is
    turned off). -> the compiled step."""
    expected = eager_answers(cuda_model)
    engine = Engine(cuda_model, cuda_graphs=True, compile_decode=True, **engine_options)
    try:
        first = engine.generate(requests(1))[0].text
        batch = [result.text for result in engine.generate(requests(8))]
        path = engine.runner.decode_path()
    finally:
        engine.close()
    assert path["compiled"] and path["cuda_graphs"]
    assert [first, *batch] == [expected[0], *expected]
    return engine.runner.compiled


def test_the_mlp_activation_stored_gives_the_eager_answers(cuda_model, monkeypatch):
    """The experiment (compiled_step.STORE_MLP_ACTIVATION): one row's gate and up apart, the activation stored."""
    monkeypatch.setattr(compiled_step, "STORE_MLP_ACTIVATION", True)
    assert_compiled_with_graphs_answers_as_eager(cuda_model)


def test_the_rotary_embedding_fused_gives_the_eager_answers(cuda_model, monkeypatch):
    """The experiment (compiled_step.FUSED_ROTARY_OPTIONS): one row's keys rotated inside the cache write."""
    monkeypatch.setattr(
        compiled_step, "COMPILE_OPTIONS", {**compiled_step.COMPILE_OPTIONS, **compiled_step.FUSED_ROTARY_OPTIONS}
    )
    assert_compiled_with_graphs_answers_as_eager(cuda_model)


def test_as_served_the_step_is_tuned_by_the_profiler_and_attends_with_the_split_kernels(
    cuda_model, split_attention_launches
):
    """GLM4V_PROFILED_TUNING and GLM4V_SPLIT_ATTENTION as served (both on), compiled and tuned
    afresh: each answer its eager one. Dynamo keeps the step it compiled for an earlier engine on
    this model and reuses it (nothing compiled, nothing tuned: the H200 session of 2026-11-27
    found 0 candidates timed here), hence its reset, besides Inductor's caches of its own."""
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    with fresh_cache():
        compiled = assert_compiled_with_graphs_answers_as_eager(cuda_model)
    assert compiled.profiled_tuning is not None
    assert compiled.profiled_tuning.fell_back == 0, "the profiler failed (see the log)"
    assert compiled.profiled_tuning.timed > 0
    launched = split_attention_launches  # before each graph's capture and in it: replays run no Python
    assert 1 in launched and any(rows > 1 for rows in launched)  # one-row and batch steps attended so


@pytest.mark.parametrize(("rows", "columns"), [(1, 48), (1, 1392), (1, 5008), (3, 304)])
def test_split_attention_attends_as_sdpa_does_in_bfloat16(rows, columns):
    """The split-KV kernels (split_attention.py) compiled for this GPU, at GLM-4.1V-9B's heads, in
    the type it decodes in (the CPU tests run them through Triton's interpreter, without bfloat16)."""
    from glm4v_bento.engine import decode_attention, split_attention

    torch.manual_seed(0)
    query = torch.randn(rows, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    buffers = torch.randn(2, rows + 1, 2, columns + 40, 128, dtype=torch.bfloat16, device="cuda")
    key, value = buffers[0, :rows, :, :columns], buffers[1, :rows, :, :columns]  # a step's view of its cache
    mask = torch.zeros(rows, 1, 1, columns, dtype=torch.bfloat16, device="cuda")
    mask[0, ..., columns - 13 :] = torch.finfo(torch.bfloat16).min
    expected, _ = decode_attention.decode_attention(None, query, key, value, mask, scaling=128**-0.5)
    got = split_attention.split_decode_attention(query, key, value, mask, 128**-0.5)
    torch.testing.assert_close(got, expected.reshape(rows, 32, 128), atol=2e-2, rtol=2e-2)


def test_split_attention_switched_off_compiled_with_graphs_gives_the_eager_answers(
    cuda_model, split_attention_launches
):
    """GLM4V_SPLIT_ATTENTION=false: every compiled step attends with SDPA, replayed from graphs."""
    assert_compiled_with_graphs_answers_as_eager(cuda_model, split_attention=False)
    assert not split_attention_launches


def test_pixels_are_pinned_for_a_cuda_model_and_answer_as_unpinned(cuda_model):
    """A CUDA model's prompts keep their pixels in page-locked memory (the prefill copies them
    without blocking); an image request answers as it does from ordinary memory."""
    from conftest import make_image

    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    request = GenerationRequest("describe both", images=[make_image(112, 56), make_image(56, 84)], params=params)
    engine = Engine(cuda_model, cuda_graphs=False, compile_decode=False)
    try:
        assert engine.prompts.build(request).pixel_values.is_pinned()
        pinned = engine.generate([request])[0].text
        engine.prompts.pin_memory = False  # the same builder, read at each build
        assert not engine.prompts.build(request).pixel_values.is_pinned()
        unpinned = engine.generate([request])[0].text
    finally:
        engine.close()
    assert pinned == unpinned
