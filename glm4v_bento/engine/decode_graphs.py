"""Decode steps replayed from CUDA graphs: one kernel launch sequence per step instead of thousands.

A 9B model's decode step is about a thousand small kernels; launched one by one from Python
the GPU waits on the CPU. A CUDA graph records them once and replays them with one call.
A graph is fixed to its shapes and tensor addresses, so steps are rounded up to buckets
(rows to a power of two, columns to a coarse step) and run over the KV cache's fixed
buffers; the spare rows and columns are masked. Graphs are captured lazily, the first time
a bucket is needed, and forgotten when the cache reallocates its buffers.

Each capture is checked against an eager run of the same step. A capture that fails or
disagrees turns graphs off for the process (with a warning) and decoding goes on eagerly:
a faster path must never be a wrong one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from glm4v_bento.engine.kv_cache import StaticKVCache, round_up

logger = logging.getLogger(__name__)

# (rows, columns) -> logits of shape (rows, vocab), reading inputs from the cache's buffers.
Forward = Callable[[int, int], torch.Tensor]
# Records ``step`` once; returns what replays it and the tensor each replay writes the logits to.
# The int names a memory pool: graphs captured with the same one share their scratch memory.
Capture = Callable[[Callable[[], torch.Tensor], int], tuple[Callable[[], None], torch.Tensor]]

# Each graph keeps its logits buffer (up to 64 rows x 151552 x 2 bytes: 19 MB; about 0.8 GB
# for all the buckets below); past this many, new buckets run without a graph. 7 row buckets
# (1 to 64) x 20 column buckets cover contexts up to 16k.
MAX_GRAPHS = 140


def row_bucket(rows: int, capacity: int) -> int:
    """A power of two (one row is a bucket of its own: a compiled step has kernels for it)."""
    return min(capacity, 1 << (rows - 1).bit_length())


def column_bucket(columns: int, capacity: int) -> int:
    """Rounded up by at most a quarter (and at least to 256): few graphs, little wasted attention."""
    step = max(256, 1 << max(0, columns.bit_length() - 3))
    return min(capacity, round_up(columns, step))


class DecodeGraphs:
    """``step`` is what gets recorded (eager or compiled); ``reference`` is the plain eager step
    each capture is checked against."""

    def __init__(self, cache: StaticKVCache, step: Forward, reference: Forward, capture: Capture) -> None:
        self.cache = cache
        self.step = step
        self.reference = reference
        self.capture = capture
        self.enabled = True
        self._graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self._generation = cache.generation
        # A new pool each time the graphs are dropped: PyTorch refuses to capture into a shared
        # pool whose graphs are all gone (an internal assertion in its caching allocator).
        self._pool = 0

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, rows: int, columns: int) -> torch.Tensor:
        """Logits of the running rows for one decode step whose inputs are loaded in the cache."""
        if self._generation != self.cache.generation:  # the buffers moved: old graphs point at freed memory
            self._drop_graphs()
            self._generation = self.cache.generation
        key = (row_bucket(rows, self.cache.row_capacity), column_bucket(columns, self.cache.usable_columns))
        graph = self._graphs.get(key)
        if graph is None:
            if not self.enabled or len(self._graphs) >= MAX_GRAPHS:
                return self.step(key[0], columns)[:rows]
            return self._capture(key, rows, columns)
        replay, logits = graph
        replay()
        return logits[:rows]

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._pool += 1

    def _turn_off(self) -> None:
        """Graphs go for good, the ones captured earlier too: something about them is not trusted."""
        self.enabled = False
        self._drop_graphs()

    def _capture(self, key: tuple[int, int], rows: int, columns: int) -> torch.Tensor:
        bucket_rows, bucket_columns = key
        reference = self.reference(bucket_rows, bucket_columns)[:rows].clone()
        try:
            replay, logits = self.capture(lambda: self.step(bucket_rows, bucket_columns), self._pool)
            replay()
        except Exception:  # any failure means: decode without graphs
            logger.warning("capturing a decode step in a CUDA graph failed; decoding eagerly", exc_info=True)
            self._turn_off()
            return reference
        if not same_logits(logits[:rows], reference):
            logger.warning(
                "a CUDA-graph decode step disagreed with the eager step (%s rows, %s columns); decoding eagerly",
                bucket_rows,
                bucket_columns,
            )
            self._turn_off()
            return reference
        self._graphs[key] = (replay, logits)
        logger.info("captured a decode step for %s rows x %s columns in a CUDA graph", bucket_rows, bucket_columns)
        return logits[:rows]


def same_logits(candidate: torch.Tensor, reference: torch.Tensor, min_correlation: float = 0.99) -> bool:
    """The same step computed two ways, up to rounding: each row's logits correlate with the
    reference's. Not exact equality, nor the same argmax: a compiled step adds in another
    order, and in bf16 near-tied logits (as random weights give) may swap places. A broken
    step (stale cache, wrong positions, garbage) correlates far less."""
    finite = reference.isfinite()  # the masked padding ids are -inf in both
    if not torch.equal(finite, candidate.isfinite()):
        return False
    columns = finite.all(dim=0)
    candidate, reference = candidate[:, columns].float(), reference[:, columns].float()
    if torch.allclose(candidate, reference, rtol=1e-4, atol=1e-4):
        return True
    candidate = candidate - candidate.mean(dim=-1, keepdim=True)
    reference = reference - reference.mean(dim=-1, keepdim=True)
    correlation = (candidate * reference).sum(-1) / (candidate.norm(dim=-1) * reference.norm(dim=-1)).clamp(min=1e-12)
    return bool(correlation.min() >= min_correlation)


def cuda_capture() -> Capture:
    """The real capture: warm up on a side stream (as CUDA graphs need), then record one step."""
    pools: dict[int, tuple[int, int]] = {}  # DecodeGraphs' pool number -> PyTorch's pool handle

    def capture(step: Callable[[], torch.Tensor], pool: int) -> tuple[Callable[[], None], torch.Tensor]:
        if pool not in pools:
            pools.clear()  # an earlier number is never asked for again
            pools[pool] = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls made by other threads (the server's) cannot break this capture.
        with torch.cuda.graph(graph, pool=pools[pool], capture_error_mode="thread_local"):
            logits = step()
        return graph.replay, logits

    return capture
