"""Settings: read from GLM4V_* variables, validated, and all documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from glm4v_bento.config import DEFAULT_MODEL, Settings


def test_the_real_model_is_the_default(monkeypatch):
    monkeypatch.delenv("GLM4V_MODEL", raising=False)
    assert Settings().model == DEFAULT_MODEL == "zai-org/GLM-4.1V-9B-Thinking"


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("GLM4V_MODEL", "/models/tiny")
    monkeypatch.setenv("GLM4V_DTYPE", "bfloat16")
    monkeypatch.setenv("GLM4V_MAX_IMAGE_BYTES", "1000")
    settings = Settings()
    assert (settings.model, settings.dtype, settings.max_image_bytes) == ("/models/tiny", "bfloat16", 1000)


def test_bad_values_are_refused_with_the_variable_named(monkeypatch):
    monkeypatch.setenv("GLM4V_DTYPE", "float8")
    with pytest.raises(ValidationError, match="dtype"):
        Settings()


def test_every_setting_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`GLM4V_{name.upper()}`" not in readme]
    assert missing == []


def test_device_and_dtype_resolution():
    import torch

    from glm4v_bento.engine.loader import ModelLoadError, resolve_device, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_missing_local_model_gives_a_clear_error(tmp_path):
    from glm4v_bento.engine import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path))  # an empty directory is no checkpoint
