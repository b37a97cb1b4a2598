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


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_split_attention_setting_reaches_the_compiled_step(tiny_model_dir, monkeypatch, value):
    from glm4v_bento.engine import Engine

    monkeypatch.setenv("GLM4V_SPLIT_ATTENTION", value)
    engine = Engine.from_settings(Settings(model=str(tiny_model_dir), device="cpu", compile_decode=True))
    try:
        assert engine.runner.compiled.split_attention is (value == "true")
    finally:
        engine.close()


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


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", ""])
def test_a_device_the_engine_cannot_use_is_refused_when_the_settings_are_read(device):
    from pydantic import ValidationError

    from glm4v_bento.config import Settings

    with pytest.raises(ValidationError, match="'cuda:N'"):
        Settings(device=device)
    assert Settings(device="cuda:1").device == "cuda:1"


def test_bad_settings_are_named_by_their_environment_variables_in_one_line(monkeypatch):
    from glm4v_bento.config import SettingsError, get_settings

    monkeypatch.setenv("GLM4V_DEVICE", "gpu")
    monkeypatch.setenv("GLM4V_MAX_BATCH_SIZE", "lots")
    monkeypatch.setenv("GLM4V_REDIS_URL", "http://:hunter2@cache:6379/0")  # a password: never echoed
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(info.value)
    assert "\n" not in message
    assert "GLM4V_DEVICE='gpu': 'gpu' is not a device here" in message
    assert "GLM4V_MAX_BATCH_SIZE='lots': Input should be a valid integer" in message
    assert "GLM4V_REDIS_URL (value not shown): must start with redis://" in message
    assert "hunter2" not in message


def test_a_gpu_index_past_the_visible_gpus_is_a_clear_load_error(monkeypatch):
    import torch

    from glm4v_bento.engine.loader import ModelLoadError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ModelLoadError, match=r"sees 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_missing_local_model_gives_a_clear_error(tmp_path):
    from glm4v_bento.engine import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path))  # an empty directory is no checkpoint


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 0), "float16")])
def test_auto_dtype_on_a_gpu_without_native_bfloat16_is_float16_with_a_warning(
    monkeypatch, caplog, capability, expected
):
    """A V100 or T4 (compute capability 7.x) only emulates bfloat16: auto picks float16 there, and says so."""
    import torch

    from glm4v_bento.engine.loader import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert resolve_dtype("auto", torch.device("cuda")) == getattr(torch, expected)
    assert ("no native bfloat16" in caplog.text) == (expected == "float16")
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16  # asked for: as asked


def test_bentoml_serve_with_a_bad_setting_stops_with_its_name_on_the_last_line(tiny_model_dir, tmp_path):
    from glm4v_bento.devserver import Server

    server = Server(tiny_model_dir, tmp_path / "serve.log", GLM4V_DEVICE="gpu", GLM4V_MAX_LATENCY_MS="-5")
    last_line = server.failed_start_log().strip().splitlines()[-1]
    assert last_line.startswith("glm4v_bento.config.SettingsError: GLM4V_DEVICE='gpu'")
    assert last_line.endswith("; GLM4V_MAX_LATENCY_MS='-5': Input should be greater than or equal to 1")


def test_the_command_line_reports_a_bad_setting_in_one_line(monkeypatch, capsys):
    from glm4v_bento import cli
    from glm4v_bento.config import get_settings

    monkeypatch.setenv("GLM4V_DTYPE", "fp8")
    get_settings.cache_clear()
    try:
        assert cli.main(["build"]) == 2
    finally:
        get_settings.cache_clear()
    assert capsys.readouterr().err == (
        "error: GLM4V_DTYPE='fp8': Input should be 'auto', 'bfloat16', 'float16' or 'float32'\n"
    )
