"""Attention for one new token per row, over the static KV cache, without repeating KV heads.

GLM-4.1V has 32 query heads and 2 key/value heads. transformers' SDPA path repeats the keys
and values 16 times (a copy of the cache per layer per step) whenever it is being compiled;
here the 16 query heads that share a key/value head are folded into one "query length"
axis instead, so attention reads the cache once, in eager and compiled code alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "glm4v_bento_decode"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (rows, heads, 1, head_dim)
    key: torch.Tensor,  # (rows, kv_heads, columns, head_dim)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # (rows, 1, 1, columns), additive
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    rows, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    # (rows, kv_heads, group, head_dim) -> (rows, 1, heads, head_dim), the layout the layer expects.
    return output.reshape(rows, heads, 1, head_dim).transpose(1, 2), None


AttentionInterface.register(NAME, decode_attention)
