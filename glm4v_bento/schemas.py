"""Request and response models of the native HTTP API.

The ``/v1/vision/*`` shapes are a superset of the original tutorial's (``text_prompt`` +
``max_tokens`` in, ``InferenceResponse`` out), so its clients keep working unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from glm4v_bento.engine.types import FinishReason, GenerationResult, SamplingParams, Timings, Usage
from glm4v_bento.request_origin import RequestOrigin

DEFAULT_PROMPT = "描述这张图片"  # "describe this picture", the tutorial's default
MAX_PROMPT_CHARS = 200_000


class InferenceRequest(SamplingParams):
    """The tutorial's ``request_data`` (a JSON object in a multipart form field), plus sampling."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    # The tutorial calls it max_tokens; the engine's name is accepted too.
    max_new_tokens: int | None = Field(
        None, ge=1, alias="max_tokens", description="Most new tokens (thinking included); default: the server's."
    )
    text_prompt: str = Field(DEFAULT_PROMPT, max_length=MAX_PROMPT_CHARS, description="What to ask about the image.")
    system_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    cache: bool = Field(True, description="Answer from the result cache when possible (deterministic requests).")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams.model_validate(self.model_dump(include=set(SamplingParams.model_fields)))


class BatchInferenceRequest(BaseModel):
    """The tutorial's ``batch_request``: one entry per uploaded image, in the same order."""

    model_config = ConfigDict(extra="forbid")

    requests: list[InferenceRequest] = Field(min_length=1)


class ModelInfoBrief(BaseModel):
    model_name: str
    device: str
    input_length: int = Field(description="Prompt tokens, image tokens included.")
    output_length: int = Field(description="Generated tokens.")


class InferenceResponse(BaseModel):
    """The tutorial's response, plus thinking, raw text, finish_reason and usage."""

    request_id: str
    status: Literal["success", "error"]
    result: str | None = Field(None, description="The answer (without the thinking).")
    thinking: str | None = None
    text: str | None = Field(None, description="The raw generated text, markers included.")
    box: str | None = Field(None, description="Content of the answer's <|begin_of_box|>...<|end_of_box|>.")
    finish_reason: FinishReason | None = None
    error: str | None = None
    usage: Usage | None = None
    cached: bool = Field(False, description="Served from the result cache.")
    processing_time: float = Field(description="Seconds from receiving the request to answering it.")
    model_info: ModelInfoBrief | None = None
    timestamp: str


class BatchInferenceResponse(BaseModel):
    request_id: str
    results: list[InferenceResponse]
    total_processing_time: float
    timestamp: str


class BatchItem(BaseModel):
    """One request inside the adaptive batcher (images travel base64-encoded)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    images_b64: list[str] = Field(default_factory=list)
    prompt: str = Field(DEFAULT_PROMPT, max_length=MAX_PROMPT_CHARS)
    system: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    params: SamplingParams = Field(default_factory=SamplingParams)
    cache: bool = Field(True, description="Use the result cache (deterministic requests only).")

    # The HTTP request this item came in, taken as its body is parsed: BentoML's adaptive
    # batcher runs items in a task of its own, so each result is reported back there.
    _origin: RequestOrigin = PrivateAttr(default_factory=RequestOrigin)

    @property
    def origin(self) -> RequestOrigin:
        return self._origin


class BatchOutcome(BaseModel):
    """What the batcher answers for one item: a result, or an HTTP status and a reason."""

    request_id: str
    status: int = Field(description="200, or the HTTP status this item's failure maps to.")
    error: str | None = None
    result: GenerationResult | None = None


class GenerateResponse(BaseModel):
    """The typed result of ``/generate`` (the BentoML Python client's API)."""

    request_id: str
    model: str
    thinking: str
    answer: str
    box: str | None
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    cached: bool = False


class HealthResponse(BaseModel):
    status: Literal["healthy", "loading", "unhealthy"]
    model_loaded: bool
    device: str | None
    queue_depth: int = Field(description="Requests waiting for the model.")
    running: int = Field(description="Requests in the batch that runs now.")
    timestamp: str
    error: str | None = None
