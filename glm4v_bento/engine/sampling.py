"""Pick each row's next token with that row's own sampling parameters."""

from __future__ import annotations

import torch

from glm4v_bento.engine.sequence import Sequence


def sample_next_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """``logits`` is (rows, vocab) for the last position of each sequence, in order."""
    logits = logits.float()
    needs_row_work = [
        i for i, seq in enumerate(sequences) if seq.params.repetition_penalty != 1.0 or not seq.params.greedy
    ]
    if not needs_row_work:  # all greedy, no penalty: one batched argmax
        return logits.argmax(dim=-1).tolist()

    tokens = logits.argmax(dim=-1)
    for i in needs_row_work:
        tokens[i] = _sample_row(logits[i], sequences[i])
    return tokens.tolist()


def _sample_row(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    params = seq.params
    if params.repetition_penalty != 1.0:
        row = apply_repetition_penalty(row, seq.seen_token_ids, params.repetition_penalty)
    if params.greedy:
        return row.argmax()
    row = row / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, row.numel())
        kth_best = torch.topk(row, k).values[-1]
        row = row.masked_fill(row < kth_best, float("-inf"))
    if params.top_p < 1.0:
        row = _top_p_filter(row, params.top_p)
    probs = torch.softmax(row, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=seq.generator)[0]


def apply_repetition_penalty(row: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty: seen tokens' positive logits are divided, negative ones multiplied."""
    index = torch.tensor(sorted(set(seen)), device=row.device, dtype=torch.long)
    scores = row.gather(0, index)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return row.scatter(0, index, scores)


def _top_p_filter(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches ``top_p``."""
    sorted_logits, order = torch.sort(row, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p; the best one always stays.
    drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(row).scatter(0, order, sorted_logits)
