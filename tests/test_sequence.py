"""Per-request decoding state: detokenizing pieces, EOS, stop strings, limits."""

from __future__ import annotations

import random

import pytest
import torch

from glm4v_bento.engine import GenerationRequest, SamplingParams
from glm4v_bento.engine.prompt import PreparedPrompt
from glm4v_bento.engine.sequence import IncrementalDetokenizer, Sequence


def make_sequence(loaded_model, **params) -> Sequence:
    prompt = PreparedPrompt(input_ids=[1, 2, 3], mm_token_type_ids=[0, 0, 0])
    sampling = SamplingParams(**params)
    return Sequence(
        GenerationRequest("x", params=sampling),
        prompt,
        max_new_tokens=sampling.max_new_tokens or 50,
        tokenizer=loaded_model.tokenizer,
        eos_token_ids=loaded_model.eos_token_ids,
        device=torch.device("cpu"),
        submitted_at=0.0,
    )


def ids_of(loaded_model, text: str) -> list[int]:
    return loaded_model.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("seed", range(5))
def test_detokenized_pieces_add_up_to_the_full_decode(loaded_model, seed):
    tokenizer = loaded_model.tokenizer
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(60)]
    ids += ids_of(loaded_model, "描述这张图片 <think>猫</think>")
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)


def test_multibyte_characters_are_never_split(loaded_model):
    detok = IncrementalDetokenizer(loaded_model.tokenizer)
    pieces = [detok.add(i) for i in ids_of(loaded_model, "图片中有一只猫")]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == "图片中有一只猫"


def test_eos_stops_and_is_not_text(loaded_model):
    seq = make_sequence(loaded_model)
    for token in ids_of(loaded_model, "hi"):
        seq.append(token)
    seq.append(next(iter(loaded_model.eos_token_ids)))
    assert seq.finish_reason == "stop"
    assert seq.text == "hi"
    assert seq.result().usage.completion_tokens == len(ids_of(loaded_model, "hi")) + 1


def test_ignore_eos_keeps_going(loaded_model):
    seq = make_sequence(loaded_model, ignore_eos=True, max_new_tokens=3)
    eos = loaded_model.tokenizer.convert_tokens_to_ids("<|user|>")
    seq.append(eos)
    assert not seq.finished
    seq.append(eos)
    seq.append(eos)
    assert seq.finish_reason == "length"


def test_stop_string_across_tokens(loaded_model):
    seq = make_sequence(loaded_model, stop=["cat"])
    for token in ids_of(loaded_model, "The cat sits"):
        seq.append(token)
        if seq.finished:
            break
    assert seq.finish_reason == "stop"
    assert seq.text == "The "


def test_earliest_of_several_stop_strings_wins(loaded_model):
    seq = make_sequence(loaded_model, stop=["sits", "cat"])
    for token in ids_of(loaded_model, "The cat sits"):
        seq.append(token)
        if seq.finished:
            break
    assert seq.text == "The "


def test_length_limit(loaded_model):
    seq = make_sequence(loaded_model, max_new_tokens=2)
    for token in ids_of(loaded_model, "The cat sits on the mat")[:2]:
        seq.append(token)
    assert seq.finish_reason == "length"
    assert len(seq.output_ids) == 2


def test_cancel(loaded_model):
    seq = make_sequence(loaded_model)
    seq.cancel()
    assert seq.result().finish_reason == "cancelled"
