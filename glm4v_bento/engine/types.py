"""The engine's request and result types: what goes in, what comes out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length", "cancelled", "error"]
# Why a request failed: the request itself (a client error) or the server (a bug, out of memory...).
ErrorType = Literal["invalid_request", "internal"]


# Each sampling field's bounds, the same for a request's values and for the model's defaults.
Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]


class SamplingDefaults(BaseModel):
    """What a request's unset sampling fields become: the model's own recommendation (its
    generation_config), or greedy decoding where it has none."""

    model_config = ConfigDict(frozen=True)

    temperature: Temperature = Field(0.0, allow_inf_nan=False, description="0: greedy.")
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="0: no top-k.")
    repetition_penalty: RepetitionPenalty = Field(1.0, allow_inf_nan=False)


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature == 0`` means greedy decoding. A sampling field left
    unset (None) takes the model's default (``SamplingDefaults``) when the request runs."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most; default: the server's, within the context."
    )
    temperature: Temperature | None = Field(
        None, description="0 is greedy; default: the model's (greedy unless its config samples)."
    )
    top_p: TopP | None = Field(None, description="Default: the model's (1.0 unless it says).")
    top_k: TopK | None = Field(None, description="0 disables top-k; default: the model's (0 unless it says).")
    repetition_penalty: RepetitionPenalty | None = Field(
        None, description="Default: the model's (1.0, none, unless it says)."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers the logit of every token generated so far, once."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: lowers a generated token's logit by this per occurrence."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible.")
    stop: list[str] = Field(default_factory=list, max_length=16, description="Stop strings (not returned).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (for benchmarks).")

    @field_validator("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 256 for s in value):
            raise ValueError("stop strings are at most 256 characters")
        return value

    def with_defaults(self, defaults: SamplingDefaults) -> SamplingParams:
        """These parameters with every unset sampling field taken from ``defaults``."""
        unset = {name: value for name, value in defaults.model_dump().items() if getattr(self, name) is None}
        return self.model_copy(update=unset) if unset else self

    @property
    def greedy(self) -> bool:
        if self.temperature is None:  # asking before the defaults are applied would guess wrong
            raise ValueError("temperature is unset: apply the model's defaults first (with_defaults)")
        return self.temperature == 0.0


@dataclass
class Turn:
    """One earlier message of the conversation."""

    role: Literal["user", "assistant"]
    text: str
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class Video:
    """A video as decoded frames sampled at ``fps`` frames per second."""

    frames: list[Image.Image]
    fps: float


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass
class GenerationRequest:
    """One prompt: its images (or one video), the text, and how to sample. ``logprobs``: give
    each generated token's log-probability and this many most likely alternatives (None: none)."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    video: Video | None = None
    system: str | None = None
    history: list[Turn] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    logprobs: int | None = None


class TopLogprob(BaseModel):
    token_id: int
    token: str = Field(description="The token's text (a piece of a character shows as U+FFFD).")
    bytes: list[int] = Field(description="The token's bytes: a piece of a character is its bytes.")
    logprob: float = Field(description="Natural log of its probability under the model (before sampling settings).")


class TokenLogprob(TopLogprob):
    """A generated token, and the most likely tokens at its place."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens, image and video tokens included.")
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_s: float = Field(description="Waiting for the model.")
    prefill_s: float = Field(description="Vision encoding and prompt processing of the batch.")
    decode_s: float = Field(description="From the first token to this request's last one.")
    total_s: float


class GenerationResult(BaseModel):
    request_id: str | None = None
    text: str = Field(description="The raw generated text, markers included.")
    thinking: str
    answer: str
    box: str | None = Field(None, description="Content of <|begin_of_box|>...<|end_of_box|>, if any.")
    finish_reason: FinishReason
    error: str | None = None
    error_type: ErrorType | None = None
    cached: bool = Field(False, description="Served from the result cache, not generated again.")
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = Field(
        None, description="One per generated token (usage.completion_tokens), when the request asked for them."
    )
