"""The running batch's tensors: KV cache, attention mask, positions. Rows join, leave and are trimmed.

Rows are left-padded to a common length. A group of new rows joins by padding the shorter
side on the left and concatenating along the batch dimension; leaving rows are dropped by
index; columns that became padding for every remaining row are cut off. Positions are kept
per row (multimodal RoPE), so padding never shifts a row's positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class BatchState:
    cache: DynamicCache
    attention_mask: torch.Tensor  # (rows, columns): 1 for real tokens, 0 for left padding
    lengths: torch.Tensor  # (rows,): real tokens in the cache per row
    rope_deltas: torch.Tensor  # (rows, 1): text position = real length + delta

    def __len__(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows``, in that order."""
        index = torch.tensor(rows, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.lengths = self.lengths[index]
        self.rope_deltas = self.rope_deltas[index]
        self.trim_padding()

    def merge(self, other: BatchState) -> None:
        """Append ``other``'s rows after this batch's rows."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.attention_mask = torch.cat(
            [F.pad(self.attention_mask, (width - self.width, 0)), F.pad(other.attention_mask, (width - other.width, 0))]
        )
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.rope_deltas = torch.cat([self.rope_deltas, other.rope_deltas])

    def append_column(self) -> None:
        """Every row gets one more real token (the one fed this step)."""
        ones = self.attention_mask.new_ones(len(self), 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.lengths = self.lengths + 1

    def next_positions(self) -> torch.Tensor:
        """(3, rows, 1) multimodal RoPE positions of each row's next token."""
        return (self.lengths + self.rope_deltas.squeeze(1)).view(1, -1, 1).expand(3, -1, 1)

    def trim_padding(self) -> None:
        """Drop leading columns that are padding for every row (left after long rows leave)."""
        real = self.attention_mask.any(dim=0)
        if bool(real[0]) or not bool(real.any()):
            return
        start = int(real.to(torch.int8).argmax())
        self.attention_mask = self.attention_mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, start:, :]
            layer.values = layer.values[:, :, start:, :]


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, heads, columns, dim) -> left-padded with zeros to ``width`` columns."""
    return F.pad(states, (0, 0, width - states.shape[2], 0))
