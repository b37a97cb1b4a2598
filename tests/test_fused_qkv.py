"""Decode steps project queries, keys and values with one matrix multiply over the layer's own
weights; what they compute is checked against transformers' generate in test_decode_reference."""

from __future__ import annotations

from collections import Counter

import torch
from test_bench_smoke import load_bench
from test_decode_reference import REQUESTS, STEPS, Reference, decode_alone

from glm4v_bento.engine import load_model
from glm4v_bento.engine.fused_qkv import FusedQKVAttention, fuse_qkv
from glm4v_bento.engine.runner import ModelRunner


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct memory behind a module's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.state_dict().values()}
    return sum(storages.values())


def test_fusing_keeps_the_weights_and_adds_no_memory(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu").model
    text = model.model.language_model
    attention = text.layers[0].self_attn
    before = [p.detach().clone() for p in (attention.q_proj.weight, attention.k_proj.bias, attention.v_proj.weight)]
    memory = _storage_bytes(model)

    assert fuse_qkv(text) == len(text.layers)

    assert isinstance(attention, FusedQKVAttention)
    after = (attention.q_proj.weight, attention.k_proj.bias, attention.v_proj.weight)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # The projections are views into the joined tensors, not copies beside them.
    assert attention.q_proj.weight.data_ptr() == attention.qkv_weight.data_ptr()
    assert attention.v_proj.weight.untyped_storage().data_ptr() == attention.qkv_weight.untyped_storage().data_ptr()
    assert _storage_bytes(model) == memory
    assert fuse_qkv(text) == 0  # fused once only


def test_weights_not_in_memory_are_left_alone(tiny_model_dir):
    """Offloaded layers' weights are on the meta device until accelerate brings them to run."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    text = loaded.model.model.language_model
    text.layers[0].self_attn.to("meta")
    assert fuse_qkv(text) == len(text.layers) - 1
    assert type(text.layers[0].self_attn) is not FusedQKVAttention


def test_decode_steps_take_the_fused_projection(tiny_model_dir, engine, monkeypatch):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompt = engine.prompts.build(REQUESTS[0])
    reference = Reference(loaded, prompt)  # before fusing: transformers' three projections
    calls = []
    fused_forward = FusedQKVAttention.decode_forward

    def counted(self, *args):
        calls.append(self.layer_idx)
        return fused_forward(self, *args)

    monkeypatch.setattr(FusedQKVAttention, "decode_forward", counted)
    runner = ModelRunner(loaded, max_rows=2)
    decode_alone(runner, prompt, reference)  # each step's logits against generate's

    layers = len(loaded.model.model.language_model.layers)
    assert calls == list(range(layers)) * (STEPS - 1)  # every layer of every decode step, not the prefill


def test_without_fusing_the_model_is_left_as_it_is(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    ModelRunner(loaded, max_rows=2, fuse_qkv=False)
    assert not any(isinstance(layer.self_attn, FusedQKVAttention) for layer in loaded.model.model.language_model.layers)


def test_a_compiled_one_row_step_leaves_no_weight_to_the_gemm_library(tiny_model_dir, monkeypatch):
    """What a single stream's speed on a GPU rests on. Traced as torch.compile traces a decoder
    layer of a one-row step on a CUDA device (Inductor's decompositions, its tuning on), each
    multiply by a weight (queries-keys-values, output, MLP up and down) is a reduction that
    Inductor generates and tunes, none a GEMM library call (mm, addmm). Fake tensors: no GPU
    needed. Attention's batched multiplies over the cache are not weights and stay."""
    graph = trace_one_row_layer(tiny_model_dir)
    ops = Counter(node.target for node in graph.graph.nodes if node.op == "call_function")
    assert ops[torch.ops.aten.mm.default] == 0 and ops[torch.ops.aten.addmm.default] == 0
    assert len(weight_sums(graph)) == 4


def trace_one_row_layer(tiny_model_dir) -> torch.fx.GraphModule:
    """A one-row decode layer (q/k/v fused) of the tiny model traced as torch.compile traces it
    for a CUDA device: fake tensors, Inductor's decompositions, the engine's compile options."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir).text_config
    config._attn_implementation = "sdpa"
    return load_bench("inductor_kernels").trace_one_row_layer(config)


def weight_sums(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The one-row reductions over a weight, in order: queries-keys-values, output, the MLP's gate and up
    (one, or two with the MLP activation stored), down."""
    return [
        node
        for node in graph.graph.nodes
        if node.target == torch.ops.aten.sum.dim_IntList and node.args[0].meta["val"].dim() == 3
    ]


def test_out_of_memory_while_joining_leaves_the_layers_left_as_they_were(tiny_model_dir, engine, monkeypatch, caplog):
    """The joined copy needs memory for a moment: a GPU that is nearly full keeps the rest apart."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    prompt = engine.prompts.build(REQUESTS[0])
    reference = Reference(loaded, prompt)
    text = loaded.model.model.language_model
    joins = 0
    cat = torch.cat

    def cat_until_full(tensors, *args, **kwargs):
        nonlocal joins
        joins += 1
        if joins > 2:  # the first layer's weight and bias, then no more room
            raise torch.OutOfMemoryError("CUDA out of memory")
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat_until_full)
    runner = ModelRunner(loaded, max_rows=2)
    monkeypatch.setattr(torch, "cat", cat)

    assert [isinstance(layer.self_attn, FusedQKVAttention) for layer in text.layers] == [True, False]
    assert "not enough memory to join q/k/v in layer 1" in caplog.text
    decode_alone(runner, prompt, reference)  # the mixed model still decodes what transformers does
