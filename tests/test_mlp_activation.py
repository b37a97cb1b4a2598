"""The stored-MLP-activation experiment for compiled decode layers: off by default; when on, the
down projection multiplies a stored activation, and decoding still gives transformers' logits.
Its speed is a GPU figure (bench/gpu_bench.py --store-mlp-activation)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_decode_reference import REQUESTS, Reference, join_and_leave
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


def test_a_stored_activation_is_a_layer_output_the_down_projection_reads(tiny_model_dir, stored):
    graph = trace_one_row_layer(tiny_model_dir)
    (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
    assert len(outputs) == 3
    activation = outputs[2]
    sums = weight_sums(graph)
    *_, gate, up, down = sums
    # One row: the gate and the up projection are reductions of their own (one kernel on a GPU).
    assert len(sums) == 5 and {gate, up} <= ancestors(activation) and activation in ancestors(down)
    # What is stored is the activation itself, not something the down projection would compute it
    # from: between the gate and up projections and it lies the SiLU (decomposed: an exp).
    after_them = (ancestors(activation) | {activation}) - ancestors(gate) - ancestors(up)
    assert Counter(node.target for node in after_them)[torch.ops.aten.exp.default] == 1


def test_the_activation_is_not_stored_unless_asked(tiny_model_dir):
    graph = trace_one_row_layer(tiny_model_dir)
    (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
    assert len(outputs) == 2 and len(weight_sums(graph)) == 4


def test_compiled_steps_with_the_activation_stored_decode_what_transformers_does(tiny_model_dir, engine, stored):
    """One row (gate and up apart) and batches (one multiply for both), rows joining and leaving."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompts = [engine.prompts.build(request) for request in REQUESTS]
    references = [Reference(loaded, prompt) for prompt in prompts]
    runner = ModelRunner(loaded, max_rows=8, compile_decode=True)
    join_and_leave(runner, prompts, references)
    assert runner.compiled.enabled and runner.compiled.checked  # compiled, and agreed with the eager step


def the_kernel(kernels: list[dict], role: str) -> dict:
    (kernel,) = [kernel for kernel in kernels if kernel["role"] == role]
    return kernel


def test_as_served_the_down_projection_kernel_computes_the_silu_again(gpu_kernels):
    """Why the experiment exists: the down projection's kernel computes the SiLU (an exp) inside
    its reduction, again for each block of outputs (the kernel that read its weights at 2.3 TB/s
    on an H200)."""
    served = gpu_kernels["as served"]
    assert the_kernel(served, "down projection")["exps"] == 1
    assert the_kernel(served, "gate and up")["exps"] == 0


def test_stored_the_gate_and_up_kernel_computes_the_activation_once_and_the_down_projection_reads_it(gpu_kernels):
    stored, served = gpu_kernels["MLP activation stored (experiment)"], gpu_kernels["as served"]
    gate_and_up, down = the_kernel(stored, "gate and up"), the_kernel(stored, "down projection")
    intermediate = down["reduced"]
    # Both reductions in one kernel, one output per activation value, its SiLU once after them.
    assert gate_and_up["outputs"] == intermediate and gate_and_up["exps"] == 1 and gate_and_up["stores"] == 1
    assert down["exps"] == 0 and down["loads"] == 2  # its weights and the stored activation
    assert len(stored) <= len(served)  # no kernel added to the layer
