"""The running batch's KV cache: buffers allocated once and written in place.

Each layer keeps keys and values as (rows, kv_heads, columns, head_dim). The running rows
are 0..rows-1 and are right-aligned: every row's newest token sits in column ``width - 1``,
so one decode step writes all rows' new keys and values into the same column (``width``)
and attention reads the first ``width + 1`` columns (rounded up to a multiple of 16, the
rest masked); a row shorter than the longest is padded on the left and masked out. Nothing
is concatenated per step, and the addresses stay fixed between steps, which is what lets a
decode step be captured in a CUDA graph.

Rows join after their prefill (copied in once), leave by compaction (the kept rows move
up), and columns that became padding for every row are cut from the left. Buffers grow
when rows (doubling) or columns (by a quarter) run out; ``generation`` counts
reallocations so that anything holding their addresses (captured graphs) starts again.
The memory held is rows x columns x (2 x layers x kv_heads x head_dim) values: about
40 KB per cell for GLM-4.1V-9B in bf16. It is kept for the next batch, unless a long batch
grew it past RELEASE_COLUMNS.

The host keeps each row's length, so the per-step bookkeeping needs no device readback.
"""

from __future__ import annotations

from typing import Any

import torch

_COLUMN_ALIGN = 256  # column capacity is a multiple of this (aligned attention-mask rows)
# A step attends over a multiple of this many columns; those past its newest are masked. A
# compiled step then only ever meets one case of SDPA's CUDA check on the mask's row alignment
# (8 values). On an H200, torch.compile compiled the one-row step again (5-17 s while every
# stream waited) the first time a step's columns went from unaligned to aligned: most likely
# that check.
STEP_COLUMNS_MULTIPLE = 16
RELEASE_COLUMNS = 4096  # buffers grown past this are given back when the batch empties


class StaticKVCache:
    def __init__(self, text_config: Any, *, device: torch.device, dtype: torch.dtype, max_rows: int) -> None:
        self.num_layers = text_config.num_hidden_layers
        self.kv_heads = text_config.num_key_value_heads
        self.head_dim = (
            getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        )
        self.device = device
        self.dtype = dtype
        self.max_rows = max_rows
        self.rows = 0  # running rows: 0..rows-1
        self.width = 0  # columns in use; each running row's newest token is in column width-1
        self.lengths: list[int] = []  # real tokens per running row
        self.generation = 0  # bumped whenever the buffers are reallocated
        self.row_capacity = 0
        self.column_capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._write_columns: list[torch.Tensor] = []  # per layer: (1,) index of the column written this step
        self._row_indices: list[torch.Tensor] = []  # per layer: 0..row_capacity-1 on its device
        # Per-row decode inputs, on the input device (the model's first device).
        self.mask = torch.zeros(0, 1, 1, 0, dtype=torch.bool, device=device)  # True: a real token
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # text position of the next token
        self.tokens = torch.zeros(0, dtype=torch.long, device=device)  # the token fed next
        self._host_tokens = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.rows

    # --- the batch changes (between steps)

    def join(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
        positions: torch.Tensor,
        lengths: list[int],
    ) -> None:
        """Add rows after a prefill: per-layer (keys, values) of shape (new_rows, kv_heads, p, head_dim),
        their left-padded (new_rows, p) mask, next-token positions, and real lengths."""
        new_rows, prompt_width = mask.shape
        width = max(self.width, prompt_width)
        self.reserve(self.rows + new_rows, width + 1, [keys.device for keys, _ in layers])
        if prompt_width > self.width and self.rows:
            self._shift(prompt_width - self.width)
        self.width = width
        start = width - prompt_width
        joined = slice(self.rows, self.rows + new_rows)
        for layer, (keys, values) in enumerate(layers):
            # Zeroed first: masked columns are skipped by attention only if they hold finite values.
            self.keys[layer][joined].zero_()
            self.values[layer][joined].zero_()
            self.keys[layer][joined, :, start:width] = keys
            self.values[layer][joined, :, start:width] = values
        self.mask[joined] = False
        self.mask[joined, 0, 0, start:width] = mask.to(device=self.device, dtype=torch.bool)
        self.positions[joined] = positions.to(self.device)
        self.rows += new_rows
        self.lengths.extend(lengths)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the running rows), in that order, as rows 0..len-1."""
        if not rows:
            self.clear()
            return
        if rows != list(range(len(rows))):  # else the kept rows are already in place
            kept = len(rows)
            index = torch.tensor(rows, device=self.device)
            for layer in range(self.num_layers):
                layer_index = index.to(self.keys[layer].device)
                self.keys[layer][:kept, :, : self.width] = self.keys[layer][layer_index, :, : self.width]
                self.values[layer][:kept, :, : self.width] = self.values[layer][layer_index, :, : self.width]
            self.mask[:kept] = self.mask[index]
            self.positions[:kept] = self.positions[index]
        self.rows = len(rows)
        self.lengths = [self.lengths[row] for row in rows]
        self._trim()

    def clear(self) -> None:
        """No running rows. The buffers stay for the next batch, unless a long one grew them
        past RELEASE_COLUMNS: an idle server does not sit on tens of GB."""
        self.rows = 0
        self.width = 0
        self.lengths = []
        if self.column_capacity > RELEASE_COLUMNS:
            self.keys, self.values, self._write_columns, self._row_indices = [], [], [], []
            self.row_capacity = self.column_capacity = 0
            self.generation += 1

    # --- one decode step

    def prepare_step(self, tokens: list[int] | torch.Tensor) -> int:
        """Load each running row's next token (from the host, or already on the device) and open
        column ``width`` -> columns to attend over: through ``width``, rounded up to a multiple of
        STEP_COLUMNS_MULTIPLE (the rest masked)."""
        self.reserve(self.rows, self.width + 1, None)
        if isinstance(tokens, torch.Tensor):  # sampled on the device at the step before: no round trip
            self.tokens[: self.rows].copy_(tokens)
        else:
            # Through a pinned buffer: an asynchronous copy, not a wait for the device. (The buffer
            # is free again by the next step: reading the sampled tokens back waited for this copy.)
            staged = self._host_tokens[: self.rows]
            staged.copy_(torch.tensor(tokens, dtype=torch.long))
            self.tokens[: self.rows].copy_(staged, non_blocking=True)
        for write_column in {id(t): t for t in self._write_columns}.values():
            write_column.fill_(self.width)
        # Every row, spare ones included, sees its own new token: a spare row used by a captured
        # graph then never attends over nothing (that would write NaN into the cache).
        self.mask[:, 0, 0, self.width] = True
        return round_up(self.width + 1, STEP_COLUMNS_MULTIPLE)

    def finish_step(self) -> None:
        self.width += 1
        self.positions += 1
        self.lengths = [length + 1 for length in self.lengths]

    def layer_buffers(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys, values, row indices and write column: a LayerCache's makings."""
        return self.keys[index], self.values[index], self._row_indices[index], self._write_columns[index]

    # --- buffers

    @property
    def usable_columns(self) -> int:
        """The most columns a step attends over, a multiple of STEP_COLUMNS_MULTIPLE. Some columns
        of the buffers always stay spare, so a step's slice of them is never the whole width:
        compiled code would need a second variant for that case (torch.compile compiles again
        when it first meets it)."""
        return max(0, self.column_capacity - STEP_COLUMNS_MULTIPLE)

    def reserve(self, rows: int, columns: int, layer_devices: list[torch.device] | None = None) -> None:
        """Room for ``rows`` x ``columns`` (grown as needed, never shrunk here)."""
        if rows <= self.row_capacity and columns <= self.usable_columns:
            return
        # Only the axis that ran out grows. Rows double (few reallocations; at most max_rows).
        row_capacity = self.row_capacity
        if rows > row_capacity:
            row_capacity = max(rows, min(self.max_rows, max(2 * row_capacity, 2)))
        # Columns grow by a quarter: the buffers are rows x columns, so doubling a long batch's
        # columns could ask for tens of GB at once (while the old buffers are still held).
        column_capacity = self.column_capacity
        if columns > self.usable_columns:
            column_capacity = max(columns + STEP_COLUMNS_MULTIPLE, column_capacity * 5 // 4, 2 * _COLUMN_ALIGN)
            column_capacity = round_up(column_capacity, _COLUMN_ALIGN)
        devices = layer_devices or [keys.device for keys in self.keys]
        shape = (row_capacity, self.kv_heads, column_capacity, self.head_dim)
        old_rows, old_width = self.rows, self.width
        keys = [_sized(torch.zeros(shape, dtype=self.dtype, device=device), 0, 2) for device in devices]
        values = [_sized(torch.zeros(shape, dtype=self.dtype, device=device), 0, 2) for device in devices]
        for layer in range(len(self.keys)):
            keys[layer][:old_rows, :, :old_width] = self.keys[layer][:old_rows, :, :old_width]
            values[layer][:old_rows, :, :old_width] = self.values[layer][:old_rows, :, :old_width]
        self.keys, self.values = keys, values
        mask = _sized(torch.zeros(row_capacity, 1, 1, column_capacity, dtype=torch.bool, device=self.device), 0, 3)
        mask[:old_rows, :, :, :old_width] = self.mask[:old_rows, :, :, :old_width]
        self.mask = mask
        self.positions = _grown(self.positions, row_capacity, old_rows)
        self.tokens = _grown(self.tokens, row_capacity, old_rows)
        self._host_tokens = torch.zeros(row_capacity, dtype=torch.long, pin_memory=self.device.type == "cuda")
        write_columns = {device: torch.zeros(1, dtype=torch.long, device=device) for device in set(devices)}
        self._write_columns = [write_columns[device] for device in devices]
        row_indices = {device: _sized(torch.arange(row_capacity, device=device), 0) for device in set(devices)}
        self._row_indices = [row_indices[device] for device in devices]
        self.row_capacity, self.column_capacity = row_capacity, column_capacity
        self.generation += 1

    def _shift(self, columns: int) -> None:
        """Move the running rows right by ``columns`` (a longer prompt is joining)."""
        self._move_columns(0, self.width, to=columns)
        self.mask[: self.rows, :, :, :columns] = False  # what is left there is finite: masking suffices

    def _trim(self) -> None:
        """Cut columns that are padding for every running row (left behind by a long row that ended)."""
        start = self.width - max(self.lengths)
        if start <= 0:
            return
        self._move_columns(start, self.width, to=0)
        self.mask[: self.rows, :, :, self.width - start :] = False
        self.width -= start

    def _move_columns(self, start: int, end: int, *, to: int) -> None:
        """Copy the running rows' columns [start, end) of keys, values and mask to begin at ``to``."""
        count = end - start
        buffers = [(buffer, 2) for buffer in (*self.keys, *self.values)] + [(self.mask, 3)]
        for buffer, column_dim in buffers:
            running = buffer[: self.rows]
            running.narrow(column_dim, to, count).copy_(running.narrow(column_dim, start, count).clone())


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _grown(tensor: torch.Tensor, size: int, keep: int) -> torch.Tensor:
    grown = _sized(torch.zeros(size, dtype=tensor.dtype, device=tensor.device), 0)
    grown[:keep] = tensor[:keep]
    return grown


def _sized(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    """Tell torch.compile these sizes vary (capacities grow), so a compiled step is not redone."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


class LayerCache:
    """One layer's keys and values as its attention sees them in a decode step: ``update``
    stores the step's new key and value in the write column and returns what to attend over.
    Built from tensors and a size alone, so a compiled layer needs no layer index: one
    compilation serves every layer."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        row_indices: torch.Tensor,
        write_column: torch.Tensor,
        columns: int,
    ) -> None:
        self.keys, self.values = keys, values
        self.row_indices, self.write_column = row_indices, write_column
        self.columns = columns

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = key.shape[0]
        # Written through the whole buffer with index tensors, not into a slice of it: compiled,
        # a write into a slice becomes a copy of the slice (the entire cache) and back.
        at = (self.row_indices[:rows], slice(None), self.write_column)
        self.keys[at] = key[:, :, 0]
        self.values[at] = value[:, :, 0]
        return self.keys[:rows, :, : self.columns], self.values[:rows, :, : self.columns]
