"""Pick each row's next token with that row's own sampling parameters.

All rows that sample (temperature > 0) are filtered together: one sort of their logits
serves top-k and top-p for every row at once, whatever each row asked for. Only the random
draw is per row, so that a seeded request repeats whatever else shares its batch.
"""

from __future__ import annotations

import torch

from glm4v_bento.engine.sequence import Sequence


@torch.inference_mode()
def sample_next_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """``logits`` is (rows, vocab) for the last position of each sequence, in order (left unchanged)."""
    return next_token_tensor(logits, sequences).tolist()


@torch.inference_mode()
def next_token_tensor(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """The same tokens as a (rows,) tensor on the logits' device, not waited for: the device
    computes them after the work already queued."""
    penalised = [i for i, seq in enumerate(sequences) if _penalised(seq)]
    sampled = [i for i, seq in enumerate(sequences) if not seq.params.greedy]
    if not penalised and not sampled:  # all greedy: the argmax of the logits as they are
        return logits.argmax(dim=-1)
    logits = logits.float().clone() if penalised else logits.float()
    for i in penalised:
        seq, params = sequences[i], sequences[i].params
        if params.repetition_penalty != 1.0:
            logits[i] = apply_repetition_penalty(logits[i], seq.seen_token_ids, params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            logits[i] = apply_occurrence_penalties(
                logits[i], seq.output_ids, params.presence_penalty, params.frequency_penalty
            )
    tokens = logits.argmax(dim=-1)
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        tokens[rows] = _draw(logits[rows], [sequences[i] for i in sampled])
    return tokens


def _draw(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """One token per row from its temperature-scaled, top-k and top-p filtered distribution."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([s.params.temperature for s in sequences], device=device)
    top_k = torch.tensor([s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in sequences], device=device)
    top_p = torch.tensor([s.params.top_p for s in sequences], device=device)

    ranked, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    beyond_k = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
    ranked = ranked.masked_fill(beyond_k, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    # Drop a token when the better tokens before it already reach top_p; the best one always stays.
    beyond_p = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    probs = torch.softmax(ranked.masked_fill(beyond_p, float("-inf")), dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), with each row's own generator.
    race = torch.stack([torch.empty(vocab, device=device).exponential_(generator=s.generator) for s in sequences])
    return order.gather(1, (probs / race).argmax(dim=-1, keepdim=True)).squeeze(1)


def _penalised(seq: Sequence) -> bool:
    params = seq.params
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


def apply_occurrence_penalties(
    row: torch.Tensor, generated: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, over the tokens generated so far (not the
    prompt): a token's logit goes down by ``presence`` once it has occurred, and by
    ``frequency`` for each time it has."""
    if not generated:
        return row
    index, counts = torch.tensor(generated, device=row.device).unique(return_counts=True)
    return row.index_add(0, index, -(presence + frequency * counts.to(row.dtype)))


def apply_repetition_penalty(row: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty: seen tokens' positive logits are divided, negative ones multiplied."""
    index = torch.tensor(sorted(set(seen)), device=row.device, dtype=torch.long)
    scores = row.gather(0, index)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return row.scatter(0, index, scores)


def token_logprobs(
    logits: torch.Tensor, sequences: list[Sequence], tokens: list[int]
) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """For each row that asked (``request.logprobs``): the chosen token's log-probability and
    its most likely alternatives, (token id, log-probability) best first; None for the others.
    From the model's distribution as it is, before temperature, filters and penalties."""
    wanted = [i for i, seq in enumerate(sequences) if seq.request.logprobs is not None]
    found: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(sequences)
    if not wanted:
        return found
    device = logits.device
    logprobs = torch.log_softmax(logits[torch.tensor(wanted, device=device)].float(), dim=-1)
    chosen = torch.tensor([tokens[i] for i in wanted], device=device)
    chosen_logprobs = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    most = max(sequences[i].request.logprobs for i in wanted)
    best_values, best_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0])
    values, ids = best_values.tolist(), best_ids.tolist()
    for row, i in enumerate(wanted):
        count = sequences[i].request.logprobs
        found[i] = (chosen_logprobs[row], list(zip(ids[row][:count], values[row][:count], strict=True)))
    return found
