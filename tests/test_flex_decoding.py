"""The FlexAttention experiment for compiled decode steps on a GPU: off by default, and when on,
the same attention as SDPA's. Its speed is a GPU figure (bench/decode_profile.py --flex)."""

from __future__ import annotations

import pytest
import torch
from test_decode_reference import REQUESTS, Reference, decode_alone, eager_replay

from glm4v_bento.engine import decode_attention as attention
from glm4v_bento.engine import load_model
from glm4v_bento.engine.runner import ModelRunner


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_decoding_attends_as_sdpa_does():
    torch.manual_seed(0)
    rows, heads, kv_heads, head_dim, columns = 3, 32, 2, 128, 300
    query = torch.randn(rows, heads, 1, head_dim)
    key, value = torch.randn(2, rows, kv_heads, columns, head_dim)
    mask = torch.zeros(rows, 1, 1, columns)
    lowest = torch.finfo(mask.dtype).min
    mask[0, ..., 200:] = lowest  # the bucket's spare columns
    mask[1, ..., :50] = lowest  # a left-padded prompt
    expected, _ = attention.decode_attention(None, query, key, value, mask, scaling=head_dim**-0.5)
    flex = attention.flex_decode(query, key, value, mask, head_dim**-0.5)
    torch.testing.assert_close(flex.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def flex_on_the_cpu(monkeypatch):
    monkeypatch.setattr(attention, "FLEX_DEVICES", {"cuda", "cpu"})
    with attention.switched_on(attention.use_flex_decoding):
        yield


def test_a_compiled_step_with_flex_decoding_decodes_what_transformers_does(
    tiny_model_dir, engine, flex_on_the_cpu, monkeypatch
):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompt = engine.prompts.build(REQUESTS[2])  # two images and a history: a long context
    reference = Reference(loaded, prompt)
    traced = []
    flex_decode = attention.flex_decode

    @torch.compiler.disable  # noted outside the graph: a list the traced code appended to would
    def note() -> None:  # be guarded on, and each step would compile again until torch.compile gave up
        traced.append(1)

    def noted(*args):
        note()
        return flex_decode(*args)

    monkeypatch.setattr(attention, "flex_decode", noted)

    runner = ModelRunner(loaded, max_rows=2, compile_decode=True)
    runner.use_graphs(eager_replay)  # steps padded to graph buckets: spare columns the mask must hide
    decode_alone(runner, prompt, reference)
    assert runner.compiled.compilations == 1  # the one-row step, compiled once: every step ran it

    assert traced  # compiled through FlexAttention...
    assert runner.compiled.enabled and runner.compiled.checked  # ...which agreed with the eager step


def test_flex_decoding_is_off_unless_asked(tiny_model_dir, engine, monkeypatch):
    monkeypatch.setattr(attention, "FLEX_DEVICES", {"cuda", "cpu"})
    loaded = load_model(str(tiny_model_dir), device="cpu")
    traced = []
    monkeypatch.setattr(attention, "flex_decode", lambda *args: traced.append(1))
    runner = ModelRunner(loaded, max_rows=2, compile_decode=True)
    prompt = engine.prompts.build(REQUESTS[0])
    decode_alone(runner, prompt, Reference(loaded, prompt))
    assert not traced and runner.compiled.checked
