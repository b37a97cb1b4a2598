"""`make demo` (glm4v-bento demo) serves the tiny model, and every example in examples/ runs against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glm4v_bento.devserver import REPO, free_port

EXAMPLES = REPO / "examples"
PYTHON = sys.executable


@pytest.fixture(scope="module")
def demo(tiny_model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(Path(PYTHON).parent / "glm4v-bento"), "demo", "--model-dir", str(tiny_model_dir), "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180
            while "Press Ctrl-C to stop" not in log.read_text(errors="replace"):
                assert process.poll() is None, log.read_text(errors="replace")[-4000:]
                assert time.monotonic() < deadline, "demo did not become ready"
                time.sleep(0.3)
            yield f"http://localhost:{port}", log
        finally:
            process.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo_prints_how_to_call_it(demo):
    url, log = demo
    banner = log.read_text(errors="replace")
    assert f"bash examples/curl.sh {url}" in banner
    assert "random tokens" in banner


def test_curl_example(demo):
    out = run("bash", str(EXAMPLES / "curl.sh"), demo[0])
    assert '"status":"success"' in out


def test_requests_example(demo):
    out = run(PYTHON, str(EXAMPLES / "requests_client.py"), demo[0])
    assert "usage:" in out and "finish_reason:" in out


def test_bentoml_client_example(demo):
    out = run(PYTHON, str(EXAMPLES / "bentoml_client.py"), demo[0])
    assert "timings:" in out and "prompt_tokens" in out


def test_async_concurrent_example(demo):
    out = run(PYTHON, str(EXAMPLES / "async_concurrent_client.py"), demo[0], "8")
    assert "8 requests in" in out and "statuses [200]" in out


def test_stream_example(demo):
    out = run(PYTHON, str(EXAMPLES / "stream_client.py"), demo[0])
    assert "usage:" in out and ("[length]" in out or "[stop]" in out)


def test_openai_example(demo):
    out = run(PYTHON, str(EXAMPLES / "openai_client.py"), demo[0])
    assert "answer:" in out and "finish_reason:" in out and "tokens" in out
