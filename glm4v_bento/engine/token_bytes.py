"""The bytes each token stands for, for log-probabilities.

A byte-level BPE token can hold part of a UTF-8 character (a Chinese character is often two
or three tokens); alone, its text decodes to U+FFFD. Its bytes are what lets a client put the
characters back together, which is what OpenAI's ``bytes`` field is for: the bytes of a
completion's tokens, joined, are the completion's text. A byte-level vocabulary writes each
byte as one printable character (GPT-2's table); added tokens (``<think>``...) are plain text.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

TokenBytes = Callable[[int], list[int]]  # token id -> its bytes


@cache
def _byte_of_character() -> dict[str, int]:
    return {character: byte for byte, character in bytes_to_unicode().items()}


def token_bytes_reader(tokenizer: Any) -> TokenBytes:
    """A token's bytes for this tokenizer. Any tokenizer but a byte-level one: the UTF-8 of the
    token's text, the best there is without knowing how its vocabulary is written."""
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def text_bytes(token_id: int) -> list[int]:
        return list(tokenizer.decode([token_id], skip_special_tokens=False).encode())

    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return text_bytes
    added = set(tokenizer.added_tokens_decoder)
    byte_of = _byte_of_character()

    def read(token_id: int) -> list[int]:
        piece = None if token_id in added else backend.id_to_token(token_id)
        if piece is None or any(character not in byte_of for character in piece):
            return text_bytes(token_id)
        return [byte_of[character] for character in piece]

    return read
