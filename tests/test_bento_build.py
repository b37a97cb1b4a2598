"""`glm4v-bento build` makes a Bento that records its model and serves it with `bentoml serve <tag>`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from conftest import encode, make_image

from glm4v_bento.devserver import Server

CLI = str(Path(sys.executable).parent / "glm4v-bento")


def cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", **env}
    return subprocess.run([CLI, *args], env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home")
    imported = cli(home, "import-model", str(tiny_model_dir), "--name", "glm4v-tiny", "--quiet")
    assert imported.returncode == 0, imported.stderr
    model_tag = imported.stdout.split("imported as ")[1].split(";")[0]
    build = cli(home, "build", GLM4V_MODEL="glm4v-tiny")
    assert build.returncode == 0, build.stderr
    bento_tag = build.stdout.strip().splitlines()[-1]
    name, version = bento_tag.split(":")
    return home, model_tag, bento_tag, home / "bentos" / name / version


def test_bento_records_its_model_and_pins_it(built):
    _, model_tag, _, bento_dir = built
    record = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    [service] = record["services"]
    assert [m["tag"] for m in service["models"]] == [model_tag]
    envs = {e["name"]: e["value"] for e in record["envs"]}
    assert envs["GLM4V_MODEL"] == model_tag  # the full name:version, not "latest"
    assert service["config"]["resources"]["gpu"] == 1
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "ENV GLM4V_MODEL=$GLM4V_MODEL" in dockerfile and model_tag in dockerfile
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements
    assert (bento_dir / "apis" / "openapi.yaml").is_file()
    assert not (bento_dir / "src" / "tests").exists()


def test_bentoml_serve_of_the_bento_tag_answers(built, tmp_path):
    home, model_tag, bento_tag, _ = built
    server = Server(None, tmp_path / "serve.log", target=bento_tag, BENTOML_HOME=str(home))
    try:
        server.wait_ready()
        files = {"image_file": ("a.png", encode(make_image(40, 40)), "image/png")}
        data = {"request_data": '{"text_prompt": "hi", "max_tokens": 4}'}
        response = requests.post(f"{server.url}/v1/vision/inference", files=files, data=data, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model_info"]["model_name"] == model_tag
    finally:
        server.stop()


def test_a_local_directory_cannot_be_built_into_a_bento(tiny_model_dir, tmp_path):
    result = cli(tmp_path, "build", GLM4V_MODEL=str(tiny_model_dir))
    assert result.returncode == 2
    assert "import-model" in result.stderr
