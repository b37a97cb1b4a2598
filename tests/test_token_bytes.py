"""Each token's bytes, as OpenAI's logprobs ``bytes`` gives them: a token holding part of a
character has that part's bytes, not the U+FFFD its text shows."""

from __future__ import annotations

import pytest

from glm4v_bento.engine.token_bytes import token_bytes_reader

TEXT = "中文 café <think>plan</think><answer>ok</answer>"


@pytest.fixture(scope="module")
def tokenizer(loaded_model):
    return loaded_model.tokenizer


def test_the_tokens_bytes_joined_are_the_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    read = token_bytes_reader(tokenizer)
    assert bytes(byte for token in ids for byte in read(token)) == TEXT.encode()
    # The case this is for: tokens that are pieces of a character read U+FFFD alone.
    assert any(tokenizer.decode([token]) == "\ufffd" for token in ids)


def test_added_tokens_are_their_text(tokenizer):
    read = token_bytes_reader(tokenizer)
    for marker in ("<think>", "</answer>", "<|begin_of_box|>"):
        assert read(tokenizer.convert_tokens_to_ids(marker)) == list(marker.encode())


def test_a_tokenizer_that_is_not_byte_level_gives_its_texts_utf8():
    class WordTokenizer:  # no Rust backend: only its decode is known
        def decode(self, ids, skip_special_tokens=False):
            return {1: "é", 2: "x"}[ids[0]]

    read = token_bytes_reader(WordTokenizer())
    assert read(1) == list("é".encode()) and read(2) == [ord("x")]
