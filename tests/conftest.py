"""Shared fixtures: the tiny model is built once per test session, offline."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a model hub


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from glm4v_bento.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def loaded_model(tiny_model_dir):
    from glm4v_bento.engine import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def engine(loaded_model):
    from glm4v_bento.engine import Engine

    eng = Engine(loaded_model, default_max_new_tokens=32)
    yield eng
    eng.close()


def make_image(width: int, height: int, color=(200, 30, 30), mode: str = "RGB") -> Image.Image:
    """A picture with some structure, so different images give different features."""
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 7):
        for y in range(0, height, 5):
            image.putpixel((x, y), ((x * 13) % 256, (y * 7) % 256, (x + y) % 256))
    return image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()
