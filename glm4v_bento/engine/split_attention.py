"""Decode attention with the cache's columns split over many blocks of threads (split-KV).

A single stream's decode attention has little work: GLM-4.1V-9B's 32 query heads share 2 KV
heads, so with the 16 query heads of a KV head folded together (decode_attention.py) SDPA's
kernel runs one block of threads per (row, KV head): 2 of an H200's 132 multiprocessors, each
walking every column in turn. On an H200 that took 8.5 µs a layer at 230 columns, and a step
after a 1024x1024 image (about 1,400 columns) took 7.4 ms against 6.1: some 30 µs a layer more,
for about 1.2 MB more of cache a layer, 0.3 µs at the card's copy bandwidth (docs/benchmarks.md).

Here each (row, KV head) is split by columns into up to ``SPLITS`` chunks, each attended by a
block of its own (the keys' scores for all 16 query heads of the chunk in one matrix multiply,
with a running softmax), and a second kernel weighs the chunks' partial results together, one
block per query head. The mask is SDPA's: additive, (rows, 1, 1, columns).

It is a custom op with a shape-only (fake) version, so a compiled step calls it as one opaque
kernel launch pair and CUDA graphs capture it. Compiled steps on a GPU take them as served
(decode_attention.py says when, and what they measured). The Triton kernels are compiled
at first use; the CPU tests run them through Triton's interpreter, in a process started with
TRITON_INTERPRET=1 (Triton reads it when it is imported).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton comes with torch's Linux wheels; without it the kernels cannot run
    triton = tl = None

SPLITS = 64  # chunks per (row, KV head) for one row: about one block per multiprocessor on an H100/H200
BATCH_SPLITS = 16  # for batches, which have blocks enough for every (row, KV head)
MIN_CHUNK = 64  # the fewest columns a chunk takes: shorter chunks cost more to combine than they save
BLOCK_COLUMNS = 32  # columns per iteration inside a chunk


def split_attention_partials(
    query,  # (rows, heads, head_dim) values, by strides
    key,  # (rows, kv_heads, columns, head_dim)
    value,
    mask,  # (rows, columns) additive, by strides
    partial_out,  # (rows * kv_heads, splits, group, head_dim) float32, unnormalised
    partial_max,  # (rows * kv_heads, splits, group) float32: the chunk's largest score
    partial_sum,  # (rows * kv_heads, splits, group) float32: its sum of exp(score - max)
    columns,
    chunk,  # columns per split (the last split's may be fewer)
    scale,
    q_row,
    q_head,
    k_row,
    k_head,
    k_column,
    v_row,
    v_head,
    v_column,
    m_row,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_BLOCK: tl.constexpr,
    SPLIT_COUNT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,  # float32's multiplies exact ("ieee"), not in TF32 as Triton's default would
):
    pair = tl.program_id(0)  # row * KV_HEADS + KV head
    split = tl.program_id(1)
    row = (pair // KV_HEADS).to(tl.int64)  # a row's offset into a large cache passes 2**31 values
    kv_head = pair % KV_HEADS
    start = split * chunk  # the grid has only the splits that attend any column
    end = tl.minimum(start + chunk, columns)

    heads = tl.arange(0, GROUP_BLOCK)
    dims = tl.arange(0, DIM_BLOCK)
    head_ok = heads < GROUP
    dim_ok = dims < HEAD_DIM
    q_ptrs = query + row * q_row + (kv_head * GROUP + heads)[:, None] * q_head + dims[None, :]
    q = tl.load(q_ptrs, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)

    largest = tl.full([GROUP_BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_BLOCK], tl.float32)
    acc = tl.zeros([GROUP_BLOCK, DIM_BLOCK], tl.float32)
    k_base = key + row * k_row + kv_head * k_head
    v_base = value + row * v_row + kv_head * v_head
    for first in range(start, end, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        tile_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * k_column + dims[None, :], mask=tile_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # (GROUP_BLOCK, BLOCK_N)
        if HAS_MASK:
            scores += tl.load(mask + row * m_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_largest = tl.maximum(largest, tl.max(scores, 1))
        weights = tl.exp(scores - new_largest[:, None])
        rescale = tl.exp(largest - new_largest)
        v = tl.load(v_base + cols[:, None] * v_column + dims[None, :], mask=tile_ok, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        total = total * rescale + tl.sum(weights, 1)
        largest = new_largest

    slot = (pair * SPLIT_COUNT + split) * GROUP + heads
    tl.store(partial_max + slot, largest, mask=head_ok)
    tl.store(partial_sum + slot, total, mask=head_ok)
    tl.store(partial_out + slot[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_ok[:, None] & dim_ok[None, :])


def split_attention_combine(
    partial_out,
    partial_max,
    partial_sum,
    output,  # (rows, heads, head_dim), contiguous
    used,  # the splits that attended columns: the first ``used`` of SPLIT_COUNT
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_BLOCK: tl.constexpr,
    SPLIT_COUNT: tl.constexpr,
):
    head_index = tl.program_id(0)  # row * heads + head
    heads = KV_HEADS * GROUP
    row = head_index // heads
    head = head_index % heads
    pair = row * KV_HEADS + head // GROUP
    splits = tl.arange(0, SPLIT_COUNT)
    dims = tl.arange(0, DIM_BLOCK)
    split_ok = splits < used
    slot = (pair * SPLIT_COUNT + splits) * GROUP + head % GROUP
    largest = tl.load(partial_max + slot, mask=split_ok, other=float("-inf"))
    total = tl.load(partial_sum + slot, mask=split_ok, other=0.0)
    overall = tl.max(largest, 0)
    weights = tl.where(split_ok, tl.exp(largest - overall), 0.0)
    parts = tl.load(
        partial_out + slot[:, None] * HEAD_DIM + dims[None, :],
        mask=split_ok[:, None] & (dims < HEAD_DIM)[None, :],
        other=0.0,
    )
    result = tl.sum(parts * weights[:, None], 0) / tl.sum(total * weights, 0)
    tl.store(output + head_index * HEAD_DIM + dims, result.to(output.dtype.element_ty), mask=dims < HEAD_DIM)


@functools.cache
def _kernels(interpreted: bool) -> tuple[Any, Any]:
    """The two kernels, built at first use, once each with and without Triton's interpreter
    (which Triton picks when it builds a kernel, from TRITON_INTERPRET). Their names say
    "attention": the decode profile groups kernels by name. Triton would compile a kernel again
    for each new case of an integer that is 1 or a multiple of 16: not for these, which change
    with the context's length (a compilation would hold every stream up)."""
    return (
        triton.jit(split_attention_partials, do_not_specialize=["columns", "chunk", "m_row"]),
        triton.jit(split_attention_combine, do_not_specialize=["used"]),
    )


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton 3.3 and later
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


@torch.library.custom_op("glm4v_bento::split_decode_attention", mutates_args=())
def split_decode_attention(
    query: torch.Tensor,  # (rows, heads, 1, head_dim)
    key: torch.Tensor,  # (rows, kv_heads, columns, head_dim)
    value: torch.Tensor,
    mask: torch.Tensor | None,  # (rows, 1, 1, columns), additive
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per row -> (rows, heads, head_dim), in the query's dtype."""
    if triton is None:
        raise RuntimeError("split decode attention needs Triton, which this torch install lacks")
    rows, heads, _, head_dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    group = heads // kv_heads
    splits = SPLITS if rows == 1 else BATCH_SPLITS
    # Chunks of at least MIN_CHUNK columns, a multiple of BLOCK_COLUMNS; only those that attend
    # any column are launched (the grid is fixed for a captured graph: so are its columns).
    chunk = max(MIN_CHUNK, _ceil_div(_ceil_div(columns, splits), BLOCK_COLUMNS) * BLOCK_COLUMNS)
    used = _ceil_div(columns, chunk)
    partials, combine = _kernels(_interpreting())
    # The kernels index by strides; the last dimension must be dense, and a query row's heads too.
    query = query.reshape(rows, heads, head_dim).contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    if mask is not None:
        mask = mask.reshape(rows, columns)
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    partial_out = torch.empty(rows * kv_heads, splits, group, head_dim, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(rows * kv_heads, splits, group, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    output = torch.empty(rows, heads, head_dim, dtype=query.dtype, device=query.device)
    shape = dict(
        KV_HEADS=kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        DIM_BLOCK=_power_of_two(head_dim),
        SPLIT_COUNT=splits,
    )
    partials[(rows * kv_heads, used)](
        query,
        key,
        value,
        mask if mask is not None else query,  # not read without a mask
        partial_out,
        partial_max,
        partial_sum,
        columns,
        chunk,
        scale,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        mask.stride(0) if mask is not None else 0,
        GROUP_BLOCK=max(16, _power_of_two(group)),  # a matrix multiply's rows: at least 16
        BLOCK_N=BLOCK_COLUMNS,
        HAS_MASK=mask is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # "tf32": Triton's default, unused for 16 bits
        **shape,
    )
    combine[(rows * heads,)](partial_out, partial_max, partial_sum, output, used, **shape)
    return output


@split_decode_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float):
    rows, heads, _, head_dim = query.shape
    return query.new_empty(rows, heads, head_dim)
