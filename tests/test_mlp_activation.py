"""The stored-MLP-activation experiment for compiled decode layers: off by default; when on, the
down projection multiplies a stored activation, and decoding still gives transformers' logits.
Its speed is a GPU figure (bench/gpu_bench.py --store-mlp-activation)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_decode_reference import REQUESTS, Reference, decode_alone
from test_fused_qkv import trace_one_row_layer, weight_sums

from glm4v_bento.engine import compiled_step, load_model
from glm4v_bento.engine.runner import ModelRunner


@pytest.fixture
def stored(monkeypatch):
    monkeypatch.setattr(compiled_step, "STORE_MLP_ACTIVATION", True)


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def test_a_stored_activation_is_a_layer_output_the_down_projection_reads(tiny_model_dir, stored, monkeypatch):
    graph = trace_one_row_layer(tiny_model_dir, monkeypatch)
    (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
    assert len(outputs) == 3
    activation = outputs[2]
    sums = weight_sums(graph)
    assert len(sums) == 4 and activation in ancestors(sums[3])  # the down projection reads it
    # What is stored is the activation itself, not something the reduction would compute it from:
    # between the up projection and it lies the SiLU (decomposed: an exp).
    after_up = (ancestors(activation) | {activation}) - ancestors(sums[2])
    assert Counter(node.target for node in after_up)[torch.ops.aten.exp.default] == 1


def test_the_activation_is_not_stored_unless_asked(tiny_model_dir, monkeypatch):
    graph = trace_one_row_layer(tiny_model_dir, monkeypatch)
    (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
    assert len(outputs) == 2 and len(weight_sums(graph)) == 4


def test_a_compiled_step_with_the_activation_stored_decodes_what_transformers_does(tiny_model_dir, engine, stored):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompt = engine.prompts.build(REQUESTS[0])
    runner = ModelRunner(loaded, max_rows=2, compile_decode=True)
    decode_alone(runner, prompt, Reference(loaded, prompt))
    assert runner.compiled.enabled and runner.compiled.checked  # compiled, and agreed with the eager step
