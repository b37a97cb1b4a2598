"""A request's decoding state: its tokens, text so far, and when it stops."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import torch

from glm4v_bento.engine.parser import parse_output
from glm4v_bento.engine.prompt import PreparedPrompt
from glm4v_bento.engine.token_bytes import token_bytes_reader
from glm4v_bento.engine.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingDefaults,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)


class IncrementalDetokenizer:
    """Decode a growing token list into text pieces without re-decoding everything each step.

    A piece is released only once its bytes form whole characters, so multi-byte
    characters split across tokens never show up as replacement characters.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.decode = _fast_decoder(tokenizer)  # ids -> text, special tokens kept
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of a short window that gives the decoder context
        self._read_offset = 0  # tokens before this are already released

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        released = self.decode(self._ids[self._prefix_offset : self._read_offset])
        window = self.decode(self._ids[self._prefix_offset :])
        if len(window) > len(released) and (final or not window.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return window[len(released) :]
        return ""


def _fast_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text, special tokens kept. Straight to the Rust tokenizer when the Python wrapper
    would add nothing (no clean-up of spaces): the wrapper's checks cost several times the
    decode itself, twice per token per row."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


class Sequence:
    """One request inside a batch."""

    def __init__(
        self,
        request: GenerationRequest,
        prompt: PreparedPrompt,
        max_new_tokens: int,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        device: torch.device,
        submitted_at: float,
        sampling_defaults: SamplingDefaults | None = None,
    ) -> None:
        self.request = request
        self.params = request.params.with_defaults(sampling_defaults or SamplingDefaults())
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._token_bytes = token_bytes_reader(tokenizer)  # for log-probabilities, when asked
        self.logprobs: list[TokenLogprob] = []  # one per output token, when the request asks
        self._logprobs_taken = 0
        self._stop_scan_from = 0
        self._emitted = 0  # how much of self.text has been handed out as deltas
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = None if self.params.greedy else torch.Generator(device=device).manual_seed(seed)
        self.submitted_at = submitted_at
        self.started_at: float | None = None
        self.prefill_done_at: float | None = None
        self.finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def seen_token_ids(self) -> list[int]:
        """Tokens the repetition penalty looks at: the prompt and the output so far."""
        return self.prompt.input_ids + self.output_ids

    def append(self, token_id: int) -> None:
        """Take the next sampled token and decide whether the sequence is done."""
        self.output_ids.append(token_id)
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
            self._finish("stop")
            return
        self.text += self._detokenizer.add(token_id)
        if self._hit_stop_string():
            self._finish("stop")
        elif len(self.output_ids) >= self.max_new_tokens:
            self.text += self._detokenizer.flush()
            self._hit_stop_string()
            self._finish("length")

    def add_logprobs(self, token_id: int, logprob: float, alternatives: list[tuple[int, float]]) -> None:
        """The log-probabilities at the place of the token about to be appended."""
        decode, read = self._detokenizer.decode, self._token_bytes

        def described(i: int) -> dict:
            return {"token_id": i, "token": decode([i]), "bytes": read(i)}

        top = [TopLogprob(**described(i), logprob=lp) for i, lp in alternatives]
        self.logprobs.append(TokenLogprob(**described(token_id), logprob=logprob, top_logprobs=top))

    def take_logprobs(self) -> list[TokenLogprob]:
        """Log-probabilities not handed out yet (with the text of ``take_delta``, or ahead of it)."""
        taken = self.logprobs[self._logprobs_taken :]
        self._logprobs_taken = len(self.logprobs)
        return taken

    def cancel(self) -> None:
        self._finish("cancelled")

    @property
    def reserved_tokens(self) -> int:
        """The most KV-cache room this request can need: its prompt and all its new tokens."""
        return self.prompt.num_tokens + self.max_new_tokens

    def take_delta(self) -> str:
        """Text not handed out yet. While running, a tail that could still begin a stop string
        is held back, so a stop string never leaks into a stream."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            end = max(self._emitted, end - max(len(s) for s in self.params.stop) + 1)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

    def _hit_stop_string(self) -> bool:
        stops = self.params.stop
        if not stops:
            return False
        found = [i for i in (self.text.find(s, self._stop_scan_from) for s in stops) if i != -1]
        if found:
            self.text = self.text[: min(found)]
            return True
        # Next time, scan only where a stop string could still begin.
        self._stop_scan_from = max(0, len(self.text) - max(len(s) for s in stops) + 1)
        return False

    def _finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.finished_at = time.perf_counter()

    def result(self) -> GenerationResult:
        parsed = parse_output(self.text)
        now = time.perf_counter()
        started = self.started_at or now
        prefill_done = self.prefill_done_at or started
        finished = self.finished_at or now
        return GenerationResult(
            request_id=self.request.request_id,
            text=self.text,
            thinking=parsed.thinking,
            answer=parsed.answer,
            box=parsed.box,
            finish_reason=self.finish_reason or "cancelled",
            usage=Usage(
                prompt_tokens=self.prompt.num_tokens,
                completion_tokens=len(self.output_ids),
                total_tokens=self.prompt.num_tokens + len(self.output_ids),
            ),
            timings=Timings(
                queue_s=started - self.submitted_at,
                prefill_s=prefill_done - started,
                decode_s=finished - prefill_done,
                total_s=finished - self.submitted_at,
            ),
            logprobs=list(self.logprobs) if self.request.logprobs is not None else None,
        )
