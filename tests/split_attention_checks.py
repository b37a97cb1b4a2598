"""The split-KV attention kernels for compiled decode steps on a GPU: as served, for one row and
for batches, and the same attention as SDPA's. Their speed is a GPU figure (bench/gpu_session.sh's
split-ab).

Its Triton kernels run here through Triton's interpreter, on the CPU. Triton decides at import
whether it interprets, so these checks run in a process of their own, started with
TRITON_INTERPRET=1 by tests/test_split_attention.py (the default test run collects only that).
The interpreter's matrix multiply gets bfloat16 wrong (it has no such type: a 16x16 product was
off by 1e10 with triton 3.8), so they cover float32 and float16; bfloat16, the GPU's type, is
tests/test_cuda_paths.py's."""

from __future__ import annotations

import os

import pytest
import torch
from test_decode_reference import REQUESTS, Reference, decode_alone, eager_replay, join_and_leave

from glm4v_bento.engine import decode_attention as attention
from glm4v_bento.engine import load_model, split_attention
from glm4v_bento.engine.runner import ModelRunner

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_split_attention.py, with Triton's interpreter", allow_module_level=True)


def sdpa(query, key, value, mask):
    output, _ = attention.decode_attention(None, query, key, value, mask, scaling=query.shape[-1] ** -0.5)
    return output.reshape(query.shape[0], query.shape[1], query.shape[-1])


def cache_slice(rows, kv_heads, columns, head_dim, dtype):
    """Keys and values as a step reads them: the first columns of larger buffers (strided views)."""
    buffers = torch.randn(2, rows + 1, kv_heads, columns + 40, head_dim, dtype=dtype)
    return buffers[0, :rows, :, :columns], buffers[1, :rows, :, :columns]


@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "head_dim", "columns"),
    [
        (1, 32, 2, 128, 48),  # GLM-4.1V-9B's heads, fewer columns than one chunk
        (1, 32, 2, 128, 1392),  # an image prompt's length: 22 chunks of 64
        (1, 32, 2, 128, 5008),  # longer than 64 chunks of 64: chunks of 96
        (3, 32, 2, 128, 304),  # batches: fewer splits, rows padded differently
        (2, 4, 2, 16, 80),  # the tiny model's heads: 2 query heads a KV head, 16 values each
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_attention_attends_as_sdpa_does(rows, heads, kv_heads, head_dim, columns, dtype):
    torch.manual_seed(0)
    query = torch.randn(rows, heads, 1, head_dim, dtype=dtype)
    key, value = cache_slice(rows, kv_heads, columns, head_dim, dtype)
    mask = torch.zeros(rows, 1, 1, columns, dtype=dtype)
    lowest = torch.finfo(dtype).min
    mask[0, ..., columns - 13 :] = lowest  # the step's spare columns past the newest
    if rows > 1:
        mask[1, ..., : columns // 3] = lowest  # a shorter row, padded on the left
    expected = sdpa(query, key, value, mask)
    got = split_attention.split_decode_attention(query, key, value, mask, head_dim**-0.5)
    assert got.dtype == dtype and got.shape == (rows, heads, head_dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_split_attention_without_a_mask_attends_to_every_column():
    torch.manual_seed(1)
    query = torch.randn(1, 32, 1, 128)
    key, value = cache_slice(1, 2, 700, 128, torch.float32)
    got = split_attention.split_decode_attention(query, key, value, None, 128**-0.5)
    torch.testing.assert_close(got, sdpa(query, key, value, None), atol=1e-5, rtol=1e-5)


@pytest.fixture
def split_on_the_cpu(monkeypatch):
    """The CPU's compiled steps take the split kernels, as a GPU's do when served."""
    monkeypatch.setattr(attention, "SPLIT_DEVICES", {"cuda", "cpu"})


def decoded_through_joins_and_leaves(tiny_model_dir, engine) -> ModelRunner:
    """A compiled runner after rows joined, left and were padded on the left, each step's logits
    checked against transformers'; the longest (two images and a history) ends alone."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompts = [engine.prompts.build(request) for request in REQUESTS]
    references = [Reference(loaded, prompt) for prompt in prompts]
    runner = ModelRunner(loaded, max_rows=4, compile_decode=True)
    runner.use_graphs(eager_replay)  # steps padded to graph buckets: spare columns the mask must hide
    join_and_leave(runner, prompts, references)
    return runner


def test_as_served_compiled_steps_of_one_row_and_of_batches_attend_with_the_split_kernels(
    tiny_model_dir, engine, split_on_the_cpu, split_attention_launches
):
    runner = decoded_through_joins_and_leaves(tiny_model_dir, engine)

    assert runner.compiled.compilations == 2  # one row, batches: nothing here made it compile again
    calls = split_attention_launches
    assert 1 in calls and any(rows > 1 for rows in calls)  # ran in the one-row and the batch steps...
    assert runner.compiled.enabled and runner.compiled.checked  # ...which agreed with the eager step


def test_split_attention_switched_off_and_the_eager_step_attend_with_sdpa(
    tiny_model_dir, engine, split_on_the_cpu, split_attention_launches
):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompt = engine.prompts.build(REQUESTS[0])
    switched_off = ModelRunner(loaded, max_rows=2, compile_decode=True, split_attention=False)
    decode_alone(switched_off, prompt, Reference(loaded, prompt))  # GLM4V_SPLIT_ATTENTION=false
    assert switched_off.compiled.enabled and not split_attention_launches

    as_served_uncompiled = ModelRunner(loaded, max_rows=2)  # a CPU's default: eager steps, split attention on
    decode_alone(as_served_uncompiled, prompt, Reference(loaded, prompt))
    assert as_served_uncompiled.compiled is None
    assert not split_attention_launches  # eager steps (which also check each compilation) attend with SDPA
