"""The native API's plumbing between HTTP inputs and the batcher, free of BentoML.

Uploads are checked here (size, then a full decode) so that a bad image is refused at
once with its own 4xx and never occupies a place in a batch; the decoded image is the one the
model gets.
"""

from __future__ import annotations

import time
from pathlib import Path

from glm4v_bento.images import CheckedImage, ImageError, ImageLimits, check_image
from glm4v_bento.schemas import BatchItem, BatchOutcome, InferenceRequest, InferenceResponse, ModelInfoBrief
from glm4v_bento.serving import image_error_status, now_iso


class ApiError(Exception):
    """A request the API answers with ``status`` and ``message`` instead of a result."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_image_upload(path: Path, limits: ImageLimits, label: str = "image") -> CheckedImage:
    """An uploaded image, once it is known to decode within the limits."""
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ApiError(413, f"{label}: the image is {size:,} bytes; the limit is {limits.max_bytes:,} bytes")
    try:
        return check_image(path.read_bytes(), limits)
    except ImageError as exc:
        raise ApiError(image_error_status(exc), f"{label}: {exc}") from None


def to_batch_item(request_id: str, request: InferenceRequest) -> BatchItem:
    """The batcher's item for a request from this process. Its images stay with the host (see
    ``ModelHost.claim``): sending them through the batcher would mean base64, JSON and a second decode."""
    return BatchItem(
        request_id=request_id,
        prompt=request.text_prompt,
        system=request.system_prompt,
        params=request.sampling_params(),
        cache=request.cache,
    )


def inference_response(
    request_id: str, outcome: BatchOutcome, started: float, model_name: str, device: str
) -> InferenceResponse:
    """The tutorial's response shape for one outcome, success or failure."""
    elapsed = time.perf_counter() - started
    result = outcome.result
    if result is None:
        return InferenceResponse(
            request_id=request_id, status="error", error=outcome.error, processing_time=elapsed, timestamp=now_iso()
        )
    return InferenceResponse(
        request_id=request_id,
        status="success",
        result=result.answer,
        thinking=result.thinking,
        text=result.text,
        box=result.box,
        finish_reason=result.finish_reason,
        usage=result.usage,
        cached=result.cached,
        processing_time=elapsed,
        model_info=ModelInfoBrief(
            model_name=model_name,
            device=device,
            input_length=result.usage.prompt_tokens,
            output_length=result.usage.completion_tokens,
        ),
        timestamp=now_iso(),
    )


def error_response(request_id: str, message: str, started: float) -> InferenceResponse:
    return inference_response(
        request_id, BatchOutcome(request_id=request_id, status=400, error=message), started, "", ""
    )
