"""Shared fixtures: the tiny model is built once per test session, offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

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


def host_for(path: str, **overrides):
    """A ModelHost (what the service holds) for the model at ``path``, on the CPU; it starts loading."""
    from glm4v_bento.config import Settings
    from glm4v_bento.model_source import ModelSource
    from glm4v_bento.serving import ModelHost

    settings = Settings(model=path, device="cpu", warmup_tokens=2, **overrides)
    source = ModelSource.from_settings(settings)
    return ModelHost(settings, source, resolve_path=lambda: source.local_path(None))


def metric(url: str, name: str) -> float:
    """One sample of a server's /metrics (``name`` with its labels, if any), 0 if absent."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis server on a free loopback port, for the shared rate limits."""
    import shutil
    import subprocess
    import time

    import redis

    from glm4v_bento.devserver import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (`make test` installs Debian's)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def split_attention_launches(monkeypatch) -> list[int]:
    """The running rows of each launch of the split-KV attention kernels (split_attention.py), for
    the tiny model (2 KV heads). Counted where they launch, at run time: a compiled step calls
    their op without tracing it again, so only steps that really ran compiled count."""
    from glm4v_bento.engine import split_attention

    launched: list[int] = []
    kernels = split_attention._kernels

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(grid[0] // 2)  # the grid's first axis: rows x the tiny model's 2 KV heads
            return self.kernel[grid]

    def counted(interpreted: bool):
        partials, combine = kernels(interpreted)
        return Counted(partials), combine

    monkeypatch.setattr(split_attention, "_kernels", counted)
    return launched


@pytest.fixture(scope="session")
def gpu_kernels() -> dict[str, list[dict]]:
    """bench/inductor_kernels.py: the Triton kernels Inductor writes for one decoder layer of a
    one-row step of GLM-4.1V-9B on a GPU (written on this machine as for an H200, not run), as
    served and for each experiment (label -> kernels). In a process of its own, because it
    answers Inductor's questions about the device with an H200's figures."""
    script = Path(__file__).resolve().parent.parent / "bench" / "inductor_kernels.py"
    result = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)
