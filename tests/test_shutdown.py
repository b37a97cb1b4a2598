"""Graceful shutdown: on SIGTERM nothing new is admitted, running work gets its grace, the rest is ended clearly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests
from conftest import encode, make_image

from glm4v_bento.devserver import Server
from glm4v_bento.engine import EngineClosedError, GenerationRequest, SamplingParams


def long_request(tokens: int) -> GenerationRequest:
    return GenerationRequest("long", params=SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def test_drain_lets_short_work_finish_and_ends_the_rest(loaded_model):
    from glm4v_bento.engine import Engine

    engine = Engine(loaded_model)
    short = engine.submit(long_request(20))
    endless = engine.submit(long_request(7000))
    deadline = time.monotonic() + 30
    while engine.running < 2 and not short.done:  # both admitted before the drain starts
        assert time.monotonic() < deadline
        time.sleep(0.005)
    drainer = threading.Thread(target=engine.drain, args=(3.0,))
    drainer.start()
    time.sleep(0.05)
    with pytest.raises(EngineClosedError, match="shutting down"):
        engine.submit(long_request(2))
    drainer.join(30)
    assert short.result(timeout=5).finish_reason == "length"  # finished within the grace period
    cut = endless.result(timeout=5)
    assert cut.finish_reason == "cancelled" and "shut down" in cut.error
    assert 0 < cut.usage.completion_tokens < 7000


def test_sigterm_ends_a_running_stream_with_a_clear_reason(tiny_model_dir, tmp_path):
    server = Server(tiny_model_dir, tmp_path / "serve.log", GLM4V_SHUTDOWN_GRACE_S="1")
    server.wait_ready()
    try:
        files = {
            "image_file": ("a.png", encode(make_image(32, 32)), "image/png"),
            "request_data": (None, json.dumps({"text_prompt": "x", "max_tokens": 7000, "ignore_eos": True})),
        }
        with requests.post(f"{server.url}/v1/vision/stream", files=files, stream=True, timeout=60) as response:
            lines = response.iter_lines()
            assert json.loads(next(line for line in lines if line))["type"] in ("thinking", "answer")
            os.killpg(server.process.pid, signal.SIGTERM)  # what an orchestrator does
            events = [json.loads(line) for line in lines if line]
        done = events[-1]
        assert done["type"] == "done" and done["finish_reason"] == "cancelled"
        assert "shut down" in done["error"]
        assert server.process.wait(timeout=60) is not None
    finally:
        server.stop()
