"""Slow suite (`make container-test`): the Bento becomes an OCI image that starts and serves.

On this kind of machine no registry is reachable, so the suite brings what it needs: it
installs Debian's Docker engine if none is there and starts `dockerd` (stopped at the end),
builds the `python:3.11-slim` base image locally with debootstrap when it cannot be pulled,
then builds the Bento from the tiny model, containerizes it, runs the container and calls it
through the published port. It prints the image size and the container's time to ready.

BentoML forces BuildKit: Debian's docker 20.10 client has it built in, while a newer client
without the buildx plugin (such as one in /usr/local/bin) fails, so Debian's client is put
first on PATH for `bentoml containerize`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import encode, make_image

from glm4v_bento.devserver import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

DOCKER = "/usr/bin/docker"  # Debian's docker.io client (BuildKit built in)
BASE_IMAGE = "python:3.11-slim"  # what BentoML's Dockerfile starts FROM
CLI = str(Path(sys.executable).parent / "glm4v-bento")


def run(*command: str, timeout: float = 600, quiet: bool = False, **kwargs) -> subprocess.CompletedProcess:
    if not quiet:
        print("$", " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def docker(*args: str, timeout: float = 600, quiet: bool = False) -> subprocess.CompletedProcess:
    return run(DOCKER, *args, timeout=timeout, quiet=quiet)


def _engine_answers() -> bool:
    return Path(DOCKER).exists() and docker("info", timeout=30).returncode == 0


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory):
    if not Path(DOCKER).exists() or not shutil.which("debootstrap"):
        assert run("apt-get", "update", "-qq").returncode == 0
        install = run(
            "apt-get",
            "install",
            "-y",
            "-qq",
            "docker.io",
            "debootstrap",
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        assert install.returncode == 0, install.stderr[-3000:]
    daemon = None
    if not _engine_answers():
        log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen(["dockerd", "--host", "unix:///var/run/docker.sock"], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not _engine_answers():
            assert daemon.poll() is None and time.monotonic() < deadline, "dockerd did not start"
            time.sleep(1)
    yield
    if daemon is not None:
        daemon.terminate()
        daemon.wait(timeout=60)


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (no host is hard-coded here)."""
    for source in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if source.is_file():
            match = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b", source.read_text())
            if match:
                return match.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt")


HOST_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _trust_this_machines_certificates(rootfs: Path) -> None:
    """A base image built here trusts the certificate authorities this machine trusts.

    Where HTTPS goes through an inspecting proxy, its CA is in the machine's store but not in
    a fresh Debian's; without it, pip and uv in the image build cannot reach the package index.
    """
    fresh = set(_PEM.findall((rootfs / HOST_BUNDLE.lstrip("/")).read_text()))
    extra = [cert for cert in _PEM.findall(Path(HOST_BUNDLE).read_text()) if cert not in fresh]
    local = rootfs / "usr/local/share/ca-certificates"
    local.mkdir(parents=True, exist_ok=True)
    for number, cert in enumerate(extra):
        (local / f"host-{number}.crt").write_text(cert + "\n")  # kept if the image rebuilds its bundle
    shutil.copyfile(HOST_BUNDLE, rootfs / HOST_BUNDLE.lstrip("/"))


@pytest.fixture(scope="module")
def base_image(docker_engine, tmp_path_factory):
    if docker("image", "inspect", BASE_IMAGE, timeout=30).returncode == 0:
        return BASE_IMAGE
    if docker("pull", BASE_IMAGE, timeout=300).returncode == 0:
        return BASE_IMAGE
    # No registry: build an equivalent from Debian bookworm (its python3 is 3.11).
    rootfs = tmp_path_factory.mktemp("base") / "rootfs"
    packages = "python3,python3-pip,python3-venv,ca-certificates"
    made = run(
        "debootstrap",
        "--variant=minbase",
        f"--include={packages}",
        "bookworm",
        str(rootfs),
        _debian_mirror(),
        timeout=1200,
    )
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)  # a container's python is ours
    (rootfs / "usr/bin/python").symlink_to("python3")
    _trust_this_machines_certificates(rootfs)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    changes = ['CMD ["python3"]', f"ENV SSL_CERT_FILE={HOST_BUNDLE} UV_NATIVE_TLS=1"]
    imported = subprocess.run(
        [DOCKER, "import", *(arg for change in changes for arg in ("--change", change)), "-", BASE_IMAGE],
        stdin=tar.stdout, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    tar.wait()
    assert imported.returncode == 0, imported.stderr
    print(f"built the base image {BASE_IMAGE} locally with debootstrap", flush=True)
    return BASE_IMAGE


def test_containerized_bento_starts_and_serves(tiny_model_dir, base_image, tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    imported = run(CLI, "import-model", str(tiny_model_dir), "--name", "glm4v-tiny", "--quiet", env=env)
    assert imported.returncode == 0, imported.stderr
    built = run(CLI, "build", env={**env, "GLM4V_MODEL": "glm4v-tiny"})
    assert built.returncode == 0, built.stderr
    bento_tag = built.stdout.strip().splitlines()[-1]
    image = f"glm4v-test:{bento_tag.split(':')[1]}"

    started = time.monotonic()
    path = f"{Path(DOCKER).parent}:{env['PATH']}"
    containerize = run(
        sys.executable, "-m", "bentoml", "containerize", bento_tag, "-t", image, timeout=3000, env={**env, "PATH": path}
    )
    assert containerize.returncode == 0, containerize.stdout[-4000:] + containerize.stderr[-4000:]
    build_s = time.monotonic() - started
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    port = free_port()
    container = docker("run", "-d", "-p", f"127.0.0.1:{port}:3000", image).stdout.strip()
    assert container, "docker run gave no container id"
    try:
        started = time.monotonic()
        url = f"http://127.0.0.1:{port}"
        status = None
        while time.monotonic() - started < 600:
            try:
                status = requests.get(f"{url}/readyz", timeout=5).status_code
            except requests.RequestException:
                status = None
            if status == 200:
                break
            assert docker("inspect", "--format", "{{.State.Running}}", container, quiet=True).stdout.strip() == "true"
            time.sleep(1)
        ready_s = time.monotonic() - started
        assert status == 200, docker("logs", container).stdout[-4000:]

        files = {"image_file": ("a.png", encode(make_image(48, 48)), "image/png")}
        data = {"request_data": '{"text_prompt": "描述这张图片", "max_tokens": 8}'}
        response = requests.post(f"{url}/v1/vision/inference", files=files, data=data, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success" and body["model_info"]["model_name"].startswith("glm4v-tiny:")
        print(
            f"\nimage {image}: {size / 1e9:.2f} GB, built in {build_s:.0f} s; "
            f"container ready in {ready_s:.1f} s; inference through port {port}: OK",
            flush=True,
        )
    except BaseException:
        print(docker("logs", container).stdout[-4000:])
        raise
    finally:
        docker("rm", "-f", container)
        docker("rmi", image)  # several GB; the base image stays for the next run
