"""Decode steps overlapped with the host's work on the step before (on by default for a model on one GPU).

Without it, each step ends with the host waiting for the tokens it sampled; then it appends them,
streams them out and checks for stops, and only then launches the next step, while the device
idles. On an H200 that cost a single stream 0.20-0.31 ms of a 6.2 ms step: with the overlap it
decoded 3-5% faster in each of four runs (docs/benchmarks.md).
With it, the scheduler launches the next step first, fed with the tokens just sampled straight
from device memory, and reads them back and does its work while that step runs. It learns a
row has finished one step late: the row rides along for that step and its extra token is
dropped, so every answer is what it would have been.
"""

from __future__ import annotations

from typing import Any

import torch

# (sequence, its handle) per row, as the scheduler keeps them
Row = tuple[Any, Any]


class PendingTokens:
    """The tokens one decode step sampled, on their way from the device to the host."""

    def __init__(self, rows: list[Row], tokens: torch.Tensor, staging: torch.Tensor | None) -> None:
        self.rows = rows  # in the order of the step that sampled them
        self.tokens = tokens  # (rows,) on the device, the next step's input
        self._ready: torch.cuda.Event | None = None
        if staging is not None:  # a pinned buffer: the copy runs behind the work already queued
            self._host = staging[: len(rows)]
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(tokens.device))  # the tokens' device, not the thread's
        else:
            self._host = tokens

    def wait(self) -> list[int]:
        """The tokens on the host, once the device has sampled them (not waiting for later work)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()

    def feed(self, running: list[Row]) -> torch.Tensor | list[int]:
        """The next step's input for ``running``: each row's pending token, from device memory.
        Rows may have left since (compaction keeps the others in order) and rows may have joined
        after them, with their first token from their prefill."""
        where = {id(seq): i for i, (seq, _) in enumerate(self.rows)}
        index = [where.get(id(seq)) for seq, _ in running]
        known = [i for i in index if i is not None]
        if index[: len(known)] != known:  # not the usual shape: read the tokens back first
            tokens = self.wait()
            return [seq.output_ids[-1] if i is None else tokens[i] for (seq, _), i in zip(running, index, strict=True)]
        fed = self.tokens
        if known != list(range(len(self.rows))):
            fed = fed[torch.tensor(known, dtype=torch.long, device=fed.device)]
        joined = [seq.output_ids[-1] for seq, _ in running[len(known) :]]
        if joined:
            fed = torch.cat([fed, torch.tensor(joined, dtype=fed.dtype, device=fed.device)])
        return fed
