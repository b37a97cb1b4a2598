"""Every setting of glm4v-bento in one typed place.

Each field is read from the environment variable ``GLM4V_<FIELD NAME IN CAPITALS>``
(for example ``GLM4V_MODEL``, ``GLM4V_DTYPE``). The README lists them all.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "zai-org/GLM-4.1V-9B-Thinking"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GLM4V_", extra="ignore", protected_namespaces=(), env_ignore_empty=True
    )

    # --- which model, and where it runs
    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face model id or local checkpoint directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="'auto' picks bfloat16 on CUDA (float16 on GPUs without native bfloat16: V100, T4) "
        "and float32 on CPU.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel used by the language model and vision encoder."
    )
    cuda_graphs: bool = Field(
        True, description="Replay decode steps from CUDA graphs (one GPU only; checked against eager steps)."
    )
    compile_decode: bool | None = Field(
        None, description="torch.compile the decode step. Unset: on when the model sits on one GPU, off otherwise."
    )
    overlap_steps: bool | None = Field(
        None,
        description="Launch each decode step before the host reads back the tokens of the step before, so the "
        "host's work (streaming, stop checks) runs while the GPU computes. Requests asking for logprobs step "
        "without it. Unset: on when the model sits on one GPU, off otherwise.",
    )
    split_attention: bool = Field(
        True,
        description="A compiled decode step on a GPU attends with this project's split-KV kernels, "
        "which spread the cache over all the GPU's multiprocessors; false: PyTorch's SDPA.",
    )
    profiled_tuning: bool = Field(
        True,
        description="While torch.compile tunes the decode step's GPU kernels, time each candidate by its "
        "device time from the profiler (steadier picks for one-row kernels); false: Inductor's own timing.",
    )

    # --- fitting the model on smaller GPUs (the tutorial's device_map / max_memory / offload)
    device_map: str | None = Field(
        None, description="'auto', 'balanced'...: spread the model over GPUs, CPU and disk (accelerate)."
    )
    max_memory: dict[str, str] | None = Field(
        None, description='Per-device memory for device_map, as JSON: {"0": "20GiB", "cpu": "64GiB"}.'
    )
    offload_folder: str | None = Field(None, description="Where device_map puts the layers that fit nowhere else.")

    # --- generation defaults and bounds
    default_max_new_tokens: int = Field(
        8192, ge=1, description="max_new_tokens when a request names none (thinking is long)."
    )
    sampling_defaults: Literal["model", "greedy"] = Field(
        "model",
        description="What a request's unset temperature, top_p, top_k and repetition_penalty become. model: the "
        "checkpoint's generation_config, as model.generate() would use it (greedy where it does not sample). "
        "greedy: greedy decoding with no penalty, whatever the checkpoint says.",
    )
    max_images_per_request: int = Field(8, ge=1, description="Images one request may carry.")

    # --- serving (BentoML service)
    gpu_type: str = Field("nvidia-a100-80gb", description="GPU type the service asks for when deployed.")
    request_timeout_s: int = Field(600, ge=1, description="A request running longer is answered with 504.")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once; more are answered with 429.")
    body_timeout_s: float = Field(
        60, gt=0, description="A request body that stops arriving (no bytes for this long) is answered with 408."
    )
    adaptive_batching: bool = Field(
        True, description="Merge concurrent requests into one batch (off: each request runs alone)."
    )
    max_batch_size: int = Field(32, ge=2, description="Most requests the adaptive batcher merges into one batch.")
    max_latency_ms: int = Field(
        600_000, ge=1, description="Adaptive-batching deadline: a request still queued after this gets 503."
    )
    max_batch_items: int = Field(16, ge=1, description="Items one batch-inference request may carry.")
    max_request_bytes: int | None = Field(
        None, ge=1, description="Largest request body; default: room for the most images a request may carry."
    )
    warmup_tokens: int = Field(
        16, ge=0, description="Tokens of the warm-up generation run before the service reports ready (0: none)."
    )

    # --- scheduling (the engine)
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: requests join and leave the running batch at every step; static: a batch runs "
        "until its longest request ends.",
    )
    max_running: int = Field(32, ge=1, description="Requests decoding at once in the running batch.")
    max_batch_tokens: int = Field(
        294_912,  # 32 rows of 9,216 tokens: 8,192 new ones after a 1,024-token prompt
        ge=1,
        description="KV-cache room of the running batch: rows x the longest row's prompt + max_new_tokens.",
    )
    prefill_chunk_tokens: int | None = Field(
        None,
        ge=0,
        description="Most prompt tokens prefilled between two decode steps of the running batch, so a long "
        "prompt does not pause running streams for its whole prefill. 0: a whole prompt at once. Unset: "
        "2048 on a GPU, 0 on a CPU (where attention over a chunk costs more than over a whole prompt).",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long running generations may finish before they are cancelled."
    )
    max_streams: int = Field(64, ge=1, description="Streamed requests open at once; more are refused with 429.")
    max_queue: int = Field(256, ge=0, description="Requests waiting for a place; more are refused at once (429).")

    # --- access control and rate limits
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys, comma-separated; when any are set, every API needs one."
    )
    api_keys_file: str | None = Field(None, description="A file with one API key per line (# comments).")
    metrics_require_key: bool = Field(False, description="Protect /metrics with the API keys too.")
    rate_limit_rpm: int | None = Field(
        None, ge=1, description="Requests per minute per key (per address without keys)."
    )
    rate_limit_tpm: int | None = Field(None, ge=1, description="Generated tokens per minute per key (or address).")
    redis_url: str | None = Field(None, description="Redis for limits shared by replicas, e.g. redis://host:6379/0.")

    result_cache_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Memory for cached answers of deterministic requests (0: no cache)."
    )
    result_cache_ttl_s: int = Field(3600, ge=1, description="How long cached answers live in Redis.")
    json_logs: bool = Field(True, description="One JSON access line per request on stdout (no prompts, no keys).")

    # --- OpenAI-compatible API
    served_model_name: str | None = Field(
        None, description="The model name /v1/models reports and requests must use; default: GLM4V_MODEL."
    )
    image_url_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs may be fetched (comma-separated); none by default.",
    )
    image_url_timeout_s: float = Field(10.0, gt=0, description="Time limit for fetching one image URL.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device here: use 'auto', 'cpu', 'cuda' or 'cuda:N' (a GPU's index)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return value

    @field_validator("image_url_allowed_hosts", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object, info) -> object:
        if isinstance(value, str):
            items = [item.strip() for item in value.split(",") if item.strip()]
            return [item.lower() for item in items] if info.field_name == "image_url_allowed_hosts" else items
        return value

    # --- image limits (checked before the model sees anything)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest accepted encoded image, in bytes.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest accepted width*height, checked before decoding (bomb guard)."
    )
    max_aspect_ratio: float = Field(200.0, gt=1, description="Longest side / shortest side above this is refused.")
    min_image_side: int = Field(
        28, ge=1, description="Images with a side under this many pixels are upscaled to it (model minimum)."
    )

    @property
    def request_body_limit(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        most_images = max(self.max_images_per_request, self.max_batch_items)
        return most_images * self.max_image_bytes + 1024 * 1024  # plus room for form fields

    @model_validator(mode="after")
    def _batch_items_fit_a_batch(self) -> Settings:
        if self.max_batch_items > self.max_batch_size:
            raise ValueError(
                f"GLM4V_MAX_BATCH_ITEMS ({self.max_batch_items}) must not exceed GLM4V_MAX_BATCH_SIZE "
                f"({self.max_batch_size}): one batch request goes through the batcher as one batch"
            )
        return self


class SettingsError(ValueError):
    """GLM4V_* variables whose values cannot be used, each named as it was set, in one line."""


_SECRET_SETTINGS = frozenset({"api_keys", "redis_url"})  # a Redis URL may carry a password


def settings_error(error: ValidationError) -> SettingsError:
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a rule across fields names them itself
            problems.append(message)
            continue
        field = str(item["loc"][0])  # named by its environment variable, as the user set it
        value = " (value not shown)" if field in _SECRET_SETTINGS else f"={item['input']!r}"
        problems.append(f"GLM4V_{field.upper()}{value}: {message}")
    return SettingsError("; ".join(problems))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    try:
        return Settings()
    except ValidationError as exc:
        raise settings_error(exc) from None
