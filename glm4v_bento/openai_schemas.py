"""OpenAI Chat Completions request and response shapes (the subset this server speaks)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="A data: URI (data:image/png;base64,...) or an allowed http(s) URL.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer: OpenAI's newer name for system instructions, read as system."
    )
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = Field(
        None, description="An earlier answer's thinking: never sent back to the model."
    )


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0: greedy. Default: the model's (GLM4V_SAMPLING_DEFAULTS)."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=16, description="Choices to generate (they run side by side in the batch).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool = Field(False, description="Each generated token's log-probability (thinking included).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token; needs logprobs.")
    # vLLM-style extras
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    cache: bool = Field(True, description="Answer from the result cache when possible (deterministic, not streamed).")
    # OpenAI parameters for features this server lacks. Clients and frameworks send some of them
    # with values that ask for nothing; those are accepted. Any other value is refused with its
    # reason (code unsupported_parameter): ignoring it would drop what the client asked for.
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')
    tools: list[dict[str, Any]] | None = Field(None, description="Only empty: no function calling.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Only "none" (or "auto" without tools).')
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, description="Only empty: no function calling.")
    function_call: str | dict[str, Any] | None = Field(None, description='Only "none" (or "auto" without functions).')
    modalities: list[str] | None = Field(None, description='Only ["text"].')
    store: bool | None = Field(None, description="Only false: completions are not stored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted: it tags stored completions (none here).")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty.")
    reasoning_effort: str | None = Field(None, description="Not adjustable: max_tokens caps thinking and answer.")

    @field_validator("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, reason) for the first parameter that asks for a feature this server lacks."""
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format", (
                'only {"type": "text"} is supported: answers are not constrained to JSON here '
                "(ask for JSON in the prompt and parse the answer)"
            )
        no_calling = "function calling is not supported by this server"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, no_calling
        for name in ("tool_choice", "function_call"):  # "auto" with nothing to call asks for nothing
            if getattr(self, name) not in (None, "none", "auto"):
                return name, no_calling
        if self.modalities is not None and self.modalities != ["text"]:
            return "modalities", 'only ["text"] is supported: this server answers in text'
        if self.store:
            return "store", "stored completions are not supported by this server"
        if self.logit_bias:
            return "logit_bias", "not supported by this server"
        if self.reasoning_effort is not None:
            return "reasoning_effort", (
                "not supported: how long the model thinks is not adjustable here; max_tokens caps its thinking "
                "and answer together"
            )
        return None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(
        description="The token's bytes: a token may hold part of a UTF-8 character; joined, a completion's "
        "tokens' bytes are its text."
    )


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] = Field(
        description="Every generated token in order: thinking, markers, answer."
    )


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
