"""The streaming API through the real `bentoml serve`: order, completeness, and cancellation on disconnect."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import requests
from conftest import encode, make_image

from glm4v_bento.devserver import Server

IMAGE = encode(make_image(56, 56))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with Server(
        tiny_model_dir, tmp_path_factory.mktemp("logs") / "serve.log", GLM4V_MAX_RUNNING="2", GLM4V_MAX_QUEUE="1"
    ) as srv:
        yield srv


def form(request_data: dict) -> dict:
    return {"image_file": ("a.png", IMAGE, "image/png"), "request_data": (None, json.dumps(request_data))}


def stream_lines(url: str, request_data: dict) -> list[dict]:
    with requests.post(f"{url}/v1/vision/stream", files=form(request_data), stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.iter_lines() if line]


def test_streamed_pieces_add_up_to_the_non_streamed_answer(server):
    request_data = {"text_prompt": "describe", "max_tokens": 80, "ignore_eos": True}
    events = stream_lines(server.url, request_data)
    done = events[-1]
    assert done["type"] == "done" and [e["type"] for e in events].count("done") == 1
    assert all(e["type"] in ("thinking", "answer") for e in events[:-1])
    assert len(events) > 5  # pieces really arrive one by one
    assert "".join(e["text"] for e in events if e["type"] == "thinking") == done["thinking"]
    assert "".join(e["text"] for e in events if e["type"] == "answer") == done["answer"]
    assert done["usage"]["completion_tokens"] == 80 and done["finish_reason"] == "length"
    plain = requests.post(f"{server.url}/v1/vision/inference", files=form(request_data), timeout=120).json()
    assert plain["text"] == done["text"]  # same greedy tokens, streamed or not


def test_bad_input_is_refused_before_streaming_starts(server):
    files = {"image_file": ("a.png", b"not an image", "image/png")}
    response = requests.post(f"{server.url}/v1/vision/stream", files=files, timeout=30)
    assert response.status_code == 400
    assert "supported format" in response.json()["error"]


def test_a_client_that_disconnects_stops_its_generation(server):
    request_data = {"text_prompt": "long", "max_tokens": 6000, "ignore_eos": True}
    with requests.post(f"{server.url}/v1/vision/stream", files=form(request_data), stream=True, timeout=60) as response:
        first = next(line for line in response.iter_lines() if line)
        assert json.loads(first)["type"] in ("thinking", "answer")
    # The connection is closed: the generation leaves the batch long before 6000 tokens.
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/health").json()["running"] != 0:
        assert time.monotonic() < deadline, "the disconnected stream kept generating"
        time.sleep(0.1)


def _wait_health(url: str, key: str, value: int) -> None:
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/health").json()[key] != value:
        assert time.monotonic() < deadline, f"health never showed {key}={value}"
        time.sleep(0.05)


def test_a_full_queue_answers_429_at_once(server):
    long = {"text_prompt": "long", "max_tokens": 6000, "ignore_eos": True}
    streams = []
    try:
        for running in (1, 2):  # fill the two running places
            streams.append(requests.post(f"{server.url}/v1/vision/stream", files=form(long), stream=True, timeout=60))
            _wait_health(server.url, "running", running)
        streams.append(requests.post(f"{server.url}/v1/vision/stream", files=form(long), stream=True, timeout=60))
        _wait_health(server.url, "queue_depth", 1)  # and the one waiting place
        assert [r.status_code for r in streams] == [200, 200, 200]
        started = time.monotonic()
        refused = requests.post(f"{server.url}/v1/vision/stream", files=form(long), timeout=60)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert "waiting" in refused.json()["error"]
        assert time.monotonic() - started < 5
    finally:
        for response in streams:
            response.close()
    _wait_health(server.url, "running", 0)  # closing the streams stopped all three
