"""The fused-rotary experiment (compiled_step.FUSED_ROTARY_OPTIONS): Inductor options under which
a one-row decode layer on a GPU takes three Triton kernels fewer, and decoding compiled with them
still gives transformers' logits. Its speed is a GPU figure (bench/decode_profile.py --fuse-rotary)."""

from __future__ import annotations

import pytest
from test_decode_reference import REQUESTS, Reference, join_and_leave

from glm4v_bento.engine import compiled_step, load_model
from glm4v_bento.engine.runner import ModelRunner

SERVED, FUSED = "as served", "rotary embedding fused (experiment)"


def roles(kernels: list[dict], kind: str) -> list[str]:
    return sorted(kernel["role"] for kernel in kernels if kernel["kind"] == kind)


def test_as_served_the_rotary_embedding_takes_two_kernels_each_for_queries_and_keys(gpu_kernels):
    """Why the experiment exists: each half of a head is written by a kernel of its own (the
    concatenation lowered as copies into slices), and the rotated keys go through memory once
    more on their way into the cache."""
    assert roles(gpu_kernels[SERVED], "pointwise") == [
        "keys and values into the cache",
        *["keys, half of each head"] * 2,
        *["queries, half of each head"] * 2,
    ]


def test_fused_the_queries_take_one_kernel_and_the_keys_rotate_in_the_cache_write(gpu_kernels):
    served, fused = gpu_kernels[SERVED], gpu_kernels[FUSED]
    assert roles(fused, "pointwise") == ["keys and values into the cache", "queries, rotary embedding"]
    (write,) = [kernel for kernel in fused if kernel["role"] == "keys and values into the cache"]
    (served_write,) = [kernel for kernel in served if kernel["role"] == "keys and values into the cache"]
    # Keys and values stored as before, but now from the projection itself: more loads (its
    # output, bias, cos and sin), no rotated keys written apart.
    assert write["stores"] == 2 and write["loads"] > served_write["loads"]
    assert len(fused) == len(served) - 3


def test_the_fused_options_leave_the_layers_other_kernels_as_they_were(gpu_kernels):
    def others(kernels: list[dict]) -> list[tuple]:
        return [
            (kernel["role"], kernel["outputs"], kernel["reduced"], kernel["loads"], kernel["stores"], kernel["exps"])
            for kernel in kernels
            if kernel["kind"] != "pointwise"
        ]

    assert others(gpu_kernels[FUSED]) == others(gpu_kernels[SERVED])


def test_compiled_steps_with_the_rotary_fused_decode_what_transformers_does(tiny_model_dir, engine, monkeypatch):
    """The options through torch.compile on this machine (C++ kernels, not Triton: what they change
    is the lowering, which a CPU compile shares): one row and batches, rows joining and leaving."""
    monkeypatch.setattr(
        compiled_step, "COMPILE_OPTIONS", {**compiled_step.COMPILE_OPTIONS, **compiled_step.FUSED_ROTARY_OPTIONS}
    )
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompts = [engine.prompts.build(request) for request in REQUESTS]
    references = [Reference(loaded, prompt) for prompt in prompts]
    runner = ModelRunner(loaded, max_rows=8, compile_decode=True)
    assert runner.compiled.options["force_pointwise_cat"] is True
    join_and_leave(runner, prompts, references)
    assert runner.compiled.enabled and runner.compiled.checked  # compiled, and agreed with the eager step


def test_a_runner_compiles_anew_with_the_options_as_they_are_now(loaded_model, monkeypatch):
    """What decode_profile's --fuse-rotary does: the served step first, then one compiled with
    the added options, in one process; the first keeps its own."""
    monkeypatch.setattr(compiled_step, "COMPILE_OPTIONS", {"coordinate_descent_tuning": True})
    runner = ModelRunner(loaded_model, max_rows=2, compile_decode=True, cuda_graphs=False)
    served = runner.compiled
    compiled_step.COMPILE_OPTIONS.update(compiled_step.FUSED_ROTARY_OPTIONS)
    runner.compile_anew()
    assert runner.compiled is not served and runner.compiled.options == compiled_step.COMPILE_OPTIONS
    assert "force_pointwise_cat" not in served.options


def test_compiling_anew_is_refused_while_graphs_replay_the_old_step(loaded_model):
    runner = ModelRunner(loaded_model, max_rows=2, compile_decode=True, cuda_graphs=False)
    runner.use_graphs(lambda step, pool: (step, step()))
    with pytest.raises(RuntimeError, match="without CUDA graphs"):
        runner.compile_anew()
