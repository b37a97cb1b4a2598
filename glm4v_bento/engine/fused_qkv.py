"""A decode step's queries, keys and values from one matrix multiply instead of three.

A decode step reads each weight once for a few tokens, so a matrix multiply costs its weights'
bytes plus a fixed cost to launch and ramp up. GLM-4.1V's key and value projections are 2 MB
each (two KV heads) beside 32 MB for the queries: for them the fixed cost is most of the time,
twice per layer. Inference servers (vLLM, gpt-fast) lay the three weights end to end and
multiply once; this does the same.

The layer's own ``q_proj``, ``k_proj`` and ``v_proj`` weights become views into the joined
tensor, so no memory is added and prefill, which runs the model's attention as it is, reads
the same numbers. In a decode step (the cache is the engine's ``LayerCache``) the attention
module runs ``decode_forward`` below; anything else runs transformers' forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.glm4v import modeling_glm4v

from glm4v_bento.engine.decode_attention import decode_attention
from glm4v_bento.engine.kv_cache import LayerCache

logger = logging.getLogger(__name__)


class FusedQKVAttention(modeling_glm4v.Glm4vTextAttention):
    """GLM-4.1V's text attention with ``qkv_weight`` and ``qkv_bias`` (buffers, so parameter
    counts are unchanged) behind its three projections. Made by ``fuse_qkv``, never built."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if not isinstance(cache, LayerCache) or position_embeddings is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        return self.decode_forward(hidden_states, position_embeddings, attention_mask, cache), None

    def decode_forward(
        self,
        hidden: torch.Tensor,  # (rows, 1, hidden)
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache,
    ) -> torch.Tensor:
        """transformers' attention forward, step for step, but for the one projection."""
        rows, length, _ = hidden.shape
        if torch.compiler.is_compiling():
            # Bias added apart: Inductor turns a one-row multiply without bias into a reduction
            # of its own (the add fuses into it), but leaves one with bias to the GEMM library.
            qkv = F.linear(hidden, self.qkv_weight) + self.qkv_bias
        else:
            qkv = F.linear(hidden, self.qkv_weight, self.qkv_bias)
        kv_width = self.num_key_value_heads * self.head_dim
        query, key, value = qkv.split([qkv.shape[-1] - 2 * kv_width, kv_width, kv_width], dim=-1)
        query = query.view(rows, length, -1, self.head_dim).transpose(1, 2)
        key = key.view(rows, length, -1, self.head_dim).transpose(1, 2)
        value = value.view(rows, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = modeling_glm4v.apply_rotary_pos_emb(query, key, cos, sin)
        key, value = cache.update(key, value, self.layer_idx)
        output, _ = decode_attention(self, query, key, value, mask, scaling=self.scaling)
        return self.o_proj(output.reshape(rows, length, -1))


def fuse_qkv(text_model: nn.Module) -> int:
    """Join each text attention's three projections (see the module's doc) -> layers fused now.

    Layers already fused, and those whose weights are not all in memory on one device (offloaded
    by accelerate: their weights arrive only when the layer runs), are left as they are."""
    fused = 0
    for index, layer in enumerate(text_model.layers):
        attention = layer.self_attn
        if type(attention) is not modeling_glm4v.Glm4vTextAttention or not _fusable(attention):
            continue
        try:
            _join(attention)
        except torch.OutOfMemoryError:  # its joined copy did not fit, even for a moment: decode as it is
            logger.warning("not enough memory to join q/k/v in layer %d: it and the layers after it keep three", index)
            break
        attention.__class__ = FusedQKVAttention  # same module, same weights: only the decode step changes
        fused += 1
    if fused:
        logger.info("decode steps project queries, keys and values with one matrix multiply (%d layers)", fused)
    return fused


def fused_layers(text_model: nn.Module) -> int:
    return sum(isinstance(layer.self_attn, FusedQKVAttention) for layer in text_model.layers)


def _projections(attention: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    return attention.q_proj, attention.k_proj, attention.v_proj


def _fusable(attention: nn.Module) -> bool:
    if hasattr(attention, "_hf_hook"):  # accelerate moves this module's weights in and out
        return False
    tensors = [t for p in _projections(attention) for t in (p.weight, p.bias)]
    if any(t is None or t.device.type == "meta" for t in tensors):
        return False
    return len({(t.device, t.dtype) for t in tensors}) == 1


@torch.no_grad()
def _join(attention: nn.Module) -> None:
    """Joined copies first, then the projections moved onto them: a failure leaves the layer as it was."""
    projections = _projections(attention)
    weight = torch.cat([p.weight for p in projections])
    bias = torch.cat([p.bias for p in projections])
    start = 0
    for projection in projections:
        end = start + projection.weight.shape[0]
        # The old tensors are freed here: the views are all that is left of them.
        projection.weight = nn.Parameter(weight[start:end], requires_grad=projection.weight.requires_grad)
        projection.bias = nn.Parameter(bias[start:end], requires_grad=projection.bias.requires_grad)
        start = end
    attention.register_buffer("qkv_weight", weight, persistent=False)
    attention.register_buffer("qkv_bias", bias, persistent=False)
