"""Sampling: per-row parameters, filters, penalty, and the validation of parameters."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from glm4v_bento.engine import GenerationRequest, SamplingParams
from glm4v_bento.engine.prompt import PreparedPrompt
from glm4v_bento.engine.sampling import apply_occurrence_penalties, apply_repetition_penalty, sample_next_tokens
from glm4v_bento.engine.sequence import Sequence


class _NoTokenizer:
    def decode(self, ids, **_):
        return ""


def seq(prompt_ids=(0,), **params) -> Sequence:
    return Sequence(
        GenerationRequest("x", params=SamplingParams(**params)),
        PreparedPrompt(list(prompt_ids), [0] * len(prompt_ids)),
        max_new_tokens=10,
        tokenizer=_NoTokenizer(),
        eos_token_ids=frozenset(),
        device=torch.device("cpu"),
        submitted_at=0.0,
    )


LOGITS = torch.tensor([[0.0, 5.0, 4.9, 1.0, -2.0]])


def test_greedy_takes_the_best():
    assert sample_next_tokens(LOGITS, [seq()]) == [1]


def test_top_k_one_and_tiny_top_p_are_greedy():
    for params in (
        {"temperature": 1.0, "top_k": 1, "seed": 0},
        {"temperature": 1.0, "top_p": 0.01, "seed": 0},
    ):
        picks = {sample_next_tokens(LOGITS, [seq(**params)])[0] for _ in range(20)}
        assert picks == {1}, params


def test_top_k_two_only_picks_the_two_best():
    row = seq(temperature=5.0, top_k=2, seed=1)
    picks = {sample_next_tokens(LOGITS, [row])[0] for _ in range(200)}
    assert picks == {1, 2}


def test_rows_use_their_own_parameters():
    logits = LOGITS.repeat(3, 1)
    rows = [seq(), seq(temperature=1.0, top_k=1, seed=3), seq(prompt_ids=[1], repetition_penalty=10.0)]
    assert sample_next_tokens(logits, rows) == [1, 1, 2]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    row = torch.tensor([2.0, -2.0, 3.0])
    out = apply_repetition_penalty(row, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 3.0]


def test_seeded_sampling_repeats():
    first = [sample_next_tokens(LOGITS, [r])[0] for r in [seq(temperature=3.0, seed=5)] for _ in range(30)]
    second = [sample_next_tokens(LOGITS, [r])[0] for r in [seq(temperature=3.0, seed=5)] for _ in range(30)]
    assert first == second and len(set(first)) > 1


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"temperature": math.nan},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_new_tokens": 0},
        {"repetition_penalty": 0},
        {"repetition_penalty": math.inf},
        {"seed": -3},
        {"stop": [""]},
        {"unknown": 1},
    ],
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValidationError):
        SamplingParams(**bad)


def test_sampled_tokens_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    row = seq(temperature=1.0, seed=11)
    draws = [sample_next_tokens(logits, [row])[0] for _ in range(4000)]
    expected = torch.softmax(logits[0], dim=-1).tolist()
    for token, probability in enumerate(expected):
        assert abs(draws.count(token) / len(draws) - probability) < 0.03, (token, probability)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    row = seq(temperature=1.0, top_p=0.7, seed=2)  # 0.5 < 0.7 <= 0.5 + 0.3: the two best
    picks = [sample_next_tokens(probabilities.log(), [row])[0] for _ in range(400)]
    assert set(picks) == {0, 1}
    assert 0.55 < picks.count(0) / len(picks) < 0.70  # renormalised: 0.5 / 0.8


def test_a_seeded_row_repeats_whatever_shares_its_batch():
    logits = LOGITS.repeat(3, 1)
    alone = [sample_next_tokens(LOGITS, [r])[0] for r in [seq(temperature=3.0, seed=9)] for _ in range(20)]
    row = seq(temperature=3.0, seed=9)
    neighbours = [seq(temperature=2.0, seed=1), seq(temperature=1.0, top_k=3)]
    together = [sample_next_tokens(logits, [neighbours[0], row, neighbours[1]])[1] for _ in range(20)]
    assert together == alone


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    # Token 1 leads token 2 by 0.1.
    prompt_only = seq(prompt_ids=[1, 1], presence_penalty=2.0)
    assert sample_next_tokens(LOGITS, [prompt_only]) == [1]  # the prompt is not counted
    once = seq(presence_penalty=0.2)
    once.append(1)
    assert sample_next_tokens(LOGITS, [once]) == [2]
    for times, expected in ((1, 1), (3, 2)):  # 0.05 per occurrence: once is not enough, three times is
        row = seq(frequency_penalty=0.05)
        for _ in range(times):
            row.append(1)
        assert sample_next_tokens(LOGITS, [row]) == [expected]


def test_occurrence_penalties_follow_openais_formula():
    row = torch.zeros(4)
    penalised = apply_occurrence_penalties(row, [2, 2, 3], presence=0.5, frequency=0.25)
    assert penalised.tolist() == [0.0, 0.0, -1.0, -0.75]  # 0.5 + 2 x 0.25, and 0.5 + 1 x 0.25
