"""Every setting of glm4v-bento in one typed place.

Each field is read from the environment variable ``GLM4V_<FIELD NAME IN CAPITALS>``
(for example ``GLM4V_MODEL``, ``GLM4V_DTYPE``). The README lists them all.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "zai-org/GLM-4.1V-9B-Thinking"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GLM4V_", extra="ignore", protected_namespaces=())

    # --- which model, and where it runs
    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face model id or local checkpoint directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1'...")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="'auto' picks bfloat16 on CUDA and float32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel used by the language model and vision encoder."
    )

    # --- generation defaults and bounds
    default_max_new_tokens: int = Field(
        8192, ge=1, description="max_new_tokens when a request names none (thinking is long)."
    )
    max_images_per_request: int = Field(8, ge=1, description="Images one request may carry.")

    # --- image limits (checked before the model sees anything)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest accepted encoded image, in bytes.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest accepted width*height, checked before decoding (bomb guard)."
    )
    max_aspect_ratio: float = Field(200.0, gt=1, description="Longest side / shortest side above this is refused.")
    min_image_side: int = Field(
        28, ge=1, description="Images with a side under this many pixels are upscaled to it (model minimum)."
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
