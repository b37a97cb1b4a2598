"""Attention for one new token per row, over the static KV cache, without repeating KV heads.

GLM-4.1V has 32 query heads and 2 key/value heads. transformers' SDPA path repeats the keys
and values 16 times (a copy of the cache per layer per step) whenever it is being compiled;
here the 16 query heads that share a key/value head are folded into one "query length"
axis instead, so attention reads the cache once, in eager and compiled code alike.

An experiment, off unless ``use_flex_decoding(True)`` (the benchmarks' ``--flex``): in a step
compiled for a GPU, FlexAttention instead. SDPA's memory-efficient kernel divides its work by
row, head and block of queries: with the query heads folded as above, one block of threads
per (row, KV head), so a single stream's attention runs on two of the GPU's streaming
multiprocessors whatever the context's length. Inductor's flex-decoding kernel splits the
columns over all of them. Whether that pays, and from what context length, is for the GPU to say.

For the same reason, a compiled step on a GPU attends with this project's own split-KV kernels
(split_attention.py), made for this shape: one block of threads per chunk of columns, all 16
query heads of a KV head in one matrix multiply. On an H200 one stream decoded 1.20x faster with
them and tuning timed by the profiler than without either, and 1.40x after a 1024x1024 image;
batches of 8 and 32 rows 1.05x and 1.02x faster than with SDPA, in both of two alternating rounds
(2026-11-27, docs/benchmarks.md). The compiled step switches them on while it runs
(``split_attention_on``; the setting GLM4V_SPLIT_ATTENTION turns them off).
Only compiled steps take the split kernels or FlexAttention, so the eager step that checks each
compilation still attends through SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from transformers import AttentionInterface

from glm4v_bento.engine.split_attention import split_decode_attention

NAME = "glm4v_bento_decode"

# Devices whose compiled steps take FlexAttention or the split kernels (tests add "cpu").
FLEX_DEVICES = {"cuda"}
SPLIT_DEVICES = {"cuda"}
_flex_decoding = False
_splitting = False  # while a compiled step that takes the split kernels runs


def use_flex_decoding(enabled: bool) -> None:
    """Compiled steps on a GPU attend with FlexAttention (they compile again on their next step)."""
    global _flex_decoding
    _flex_decoding = enabled


@contextlib.contextmanager
def split_attention_on(enabled: bool) -> Iterator[None]:
    """While inside, compiled steps on a GPU attend with the split-KV kernels if ``enabled``. Read
    when a step is traced, so torch.compile guards on it: a step compiled under one value is not
    replayed under the other."""
    global _splitting
    before, _splitting = _splitting, enabled
    try:
        yield
    finally:
        _splitting = before


def _splits(device: torch.device) -> bool:
    return _splitting and device.type in SPLIT_DEVICES and torch.compiler.is_compiling()


@contextlib.contextmanager
def switched_on(use: Callable[[bool], None]) -> Iterator[None]:
    """One of the experiments above (its ``use_...`` switch) on while the block runs, then off."""
    use(True)
    try:
        yield
    finally:
        use(False)


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
    if _flex_decoding and query.device.type in FLEX_DEVICES and torch.compiler.is_compiling():
        output = flex_decode(query, key, value, attention_mask, scaling)
        return output.transpose(1, 2), None
    if _splits(query.device):
        scale = scaling if scaling is not None else head_dim**-0.5
        output = split_decode_attention(query, key, value, attention_mask, scale)  # (rows, heads, head_dim)
        return output.unsqueeze(1), None
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    # (rows, kv_heads, group, head_dim) -> (rows, 1, heads, head_dim), the layout the layer expects.
    return output.reshape(rows, heads, 1, head_dim).transpose(1, 2), None


def flex_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """The same attention through FlexAttention -> (rows, heads, 1, head_dim). Unfused (scores
    materialised) unless compiled: only compiled steps take it."""

    def masked(score: torch.Tensor, row: torch.Tensor, head: torch.Tensor, at: torch.Tensor, column: torch.Tensor):
        return score + attention_mask[row, 0, 0, column]

    score_mod = masked if attention_mask is not None else None
    return flex_attention(query, key, value, score_mod=score_mod, scale=scaling, enable_gqa=True)


AttentionInterface.register(NAME, decode_attention)
