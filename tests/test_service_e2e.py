"""End to end: the real `bentoml serve` on the tiny model, called the way users call it."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import bentoml
import httpx
import psutil
import pytest
import requests
from conftest import encode, make_image, metric

from glm4v_bento.devserver import Server

HOUSE = Path(__file__).resolve().parent.parent / "examples" / "images" / "house.jpg"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # A small image limit so that the 413 path is cheap to reach.
    with Server(tiny_model_dir, tmp_path_factory.mktemp("logs") / "serve.log", GLM4V_MAX_IMAGE_BYTES="300000") as srv:
        yield srv


def post_inference(url: str, image: bytes, request_data: dict | None = None, name: str = "img.png"):
    files = {"image_file": (name, image, "image/png")}
    if request_data is not None:
        files["request_data"] = (None, json.dumps(request_data), "application/json")
    return requests.post(f"{url}/v1/vision/inference", files=files, timeout=120)


def greedy(prompt: str, tokens: int) -> dict:
    # No result cache here: these tests compare generations, which a cache hit would skip.
    return {"text_prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "cache": False}


def test_tutorial_curl_command_works_unchanged(server, tmp_path):
    shutil.copy(HOUSE, tmp_path / "img.jpg")
    out = subprocess.run(
        [
            "curl", "-s", "-X", "POST", f"{server.url}/v1/vision/inference",
            "-F", "image_file=@img.jpg",
            "-F", 'request_data={"text_prompt": "描述这张图片", "max_tokens": 512}',
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    body = json.loads(out.stdout)
    assert body["status"] == "success"
    assert set(body) >= {"request_id", "result", "processing_time", "model_info", "timestamp"}
    assert body["model_info"]["input_length"] == body["usage"]["prompt_tokens"] > 0
    assert 1 <= body["model_info"]["output_length"] <= 512
    assert body["finish_reason"] in ("stop", "length")


def test_tutorial_requests_snippet_works_unchanged(server):
    with open(HOUSE, "rb") as f:
        files = {
            "image_file": ("house.jpg", f, "image/jpeg"),
            "request_data": (None, json.dumps({"text_prompt": "这是什么?", "max_tokens": 16}), "application/json"),
        }
        response = requests.post(f"{server.url}/v1/vision/inference", files=files, timeout=120)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success" and body["usage"]["completion_tokens"] <= 16
    assert body["request_id"] == response.headers["x-bentoml-request-id"]


def test_request_data_is_optional(server):
    response = post_inference(server.url, HOUSE.read_bytes(), name="house.jpg")
    assert response.status_code == 200
    assert response.json()["status"] == "success"


def test_the_server_log_shows_the_model_loading_and_becoming_ready(server):
    """What an operator watches during a start that takes minutes on a GPU (download, load, compile)."""
    log = server.log_path.read_text(errors="replace")
    for step in ("loading ", "loaded ", "warm-up done in", "model ready after"):
        assert re.search(rf"\[INFO\] \[entry_service:glm4v:1\] {step}", log), step


def test_bentoml_sync_client(server):
    with bentoml.SyncHTTPClient(server.url) as client:
        result = client.generate(prompt="hello", images=[HOUSE], params={"max_new_tokens": 6, "ignore_eos": True})
    assert result["usage"]["completion_tokens"] == 6
    assert result["finish_reason"] == "length"
    assert set(result) >= {"thinking", "answer", "text", "timings"}


def test_bentoml_async_client(server):
    async def call():
        async with bentoml.AsyncHTTPClient(server.url) as client:
            return await asyncio.gather(
                client.generate(prompt="a", params={"max_new_tokens": 3, "ignore_eos": True}),
                client.generate(prompt="b", images=[HOUSE, HOUSE], params={"max_new_tokens": 4, "ignore_eos": True}),
            )

    first, second = asyncio.run(call())
    assert first["usage"]["completion_tokens"] == 3
    assert second["usage"]["completion_tokens"] == 4
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]  # two images' tokens


def test_bentoml_client_with_an_image_made_in_memory_uses_the_batch_api(server):
    """The README's way for images made in memory: BentoML's client sends `generate`'s files from
    their file objects, which such an image lacks; `generate_batch` takes them base64-encoded."""
    picture = base64.b64encode(encode(make_image(40, 30))).decode()
    params = {"max_new_tokens": 3, "ignore_eos": True}
    with bentoml.SyncHTTPClient(server.url) as client:
        with_image, text_only = client.generate_batch(
            items=[
                {"request_id": "pic", "images_b64": [picture], "prompt": "what is it?", "params": params},
                {"request_id": "text", "prompt": "what is it?", "params": params},
            ]
        )
    assert [with_image["status"], text_only["status"]] == [200, 200]
    assert with_image["result"]["usage"]["completion_tokens"] == 3
    assert with_image["result"]["usage"]["prompt_tokens"] > text_only["result"]["usage"]["prompt_tokens"]


def _batch_size_histogram(url: str) -> dict[float, float]:
    text = httpx.get(f"{url}/metrics").text
    buckets = {}
    for line in text.splitlines():
        match = re.match(
            r'bentoml_service_adaptive_batch_size_bucket\{le="([^"]+)".*method_name="generate_batch".*\} (\S+)', line
        )
        if match:
            buckets[float(match.group(1))] = float(match.group(2))
    return buckets


def test_concurrent_requests_are_merged_and_keep_their_solo_tokens(server):
    images = [encode(make_image(40 + 8 * i, 60, (10 * i, 100, 200))) for i in range(16)]
    solo = [post_inference(server.url, images[i], greedy(f"question {i}", 12 + i)).json() for i in range(16)]
    before = _batch_size_histogram(server.url)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(lambda i: post_inference(server.url, images[i], greedy(f"question {i}", 12 + i)), range(16))
        )
    after = _batch_size_histogram(server.url)
    merged = (after[float("inf")] - before.get(float("inf"), 0)) - (after[1.0] - before.get(1.0, 0))
    assert merged >= 1, "no batch larger than 1 was recorded"
    for alone, response in zip(solo, together, strict=True):
        assert response.status_code == 200
        body = response.json()
        assert body["text"] == alone["text"]
        assert body["usage"] == alone["usage"]


def test_one_corrupt_image_among_concurrent_requests_fails_alone(server):
    good = encode(make_image(64, 64))
    corrupt = good[: len(good) // 3]
    payloads = [good] * 15 + [corrupt]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda img: post_inference(server.url, img, greedy("x", 8)), payloads))
    assert [r.status_code for r in responses[:15]] == [200] * 15
    assert responses[15].status_code == 400
    assert "corrupt or truncated" in responses[15].json()["error"]


@pytest.mark.parametrize(
    ("image", "request_data", "status", "fragment"),
    [
        (b"", None, 400, "empty"),
        (b"not an image at all", None, 400, "supported format"),
        (encode(make_image(2000, 2)), None, 400, "aspect ratio"),
        (encode(make_image(400, 400), "BMP"), None, 413, "limit is 300,000 bytes"),
        (encode(make_image(32, 32)), {"text_prompt": "x", "temperature": -1}, 400, "temperature"),
        (encode(make_image(32, 32)), {"text_prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        (encode(make_image(32, 32)), {"text_prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
        (encode(make_image(32, 32)), {"text_prompt": "x", "max_tokens": 10**6}, 400, "context"),
    ],
)
def test_bad_input_gets_a_clear_4xx(server, image, request_data, status, fragment):
    response = post_inference(server.url, image, request_data)
    assert response.status_code == status, response.text
    assert fragment in response.text
    assert "Traceback" not in response.text


def test_missing_image_file_is_a_400(server):
    response = requests.post(f"{server.url}/v1/vision/inference", files={"other": ("a", b"b")}, timeout=30)
    assert response.status_code == 400
    assert "image_file" in response.text


def test_request_data_that_is_not_json_is_a_400(server):
    files = {"image_file": ("a.png", encode(make_image(32, 32)), "image/png"), "request_data": (None, "{not json")}
    response = requests.post(f"{server.url}/v1/vision/inference", files=files, timeout=30)
    assert response.status_code == 400


def test_oversized_body_is_refused_before_it_is_read(server):
    # A client announcing a terabyte: the answer comes before any of the body is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/vision/inference HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000000000\r\n\r\n"
        )
        reply = b""
        while b"limit" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"the limit is" in reply


def _batch_files(images: list[bytes], entries: list[dict]):
    files = [("image_files", (f"{i}.png", img, "image/png")) for i, img in enumerate(images)]
    return files, {"batch_request": json.dumps({"requests": entries})}


def test_batch_inference_gives_per_item_results_and_errors(server):
    images = [encode(make_image(64, 64)), b"broken", encode(make_image(90, 30))]
    entries = [greedy("first", 5), greedy("second", 5), greedy("third", 7)]
    files, data = _batch_files(images, entries)
    response = requests.post(f"{server.url}/v1/vision/batch-inference", files=files, data=data, timeout=120)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["success", "error", "success"]
    assert "image_files[1]" in results[1]["error"]
    assert results[0]["usage"]["completion_tokens"] == 5 and results[2]["usage"]["completion_tokens"] == 7
    alone = post_inference(server.url, images[2], greedy("third", 7)).json()
    assert results[2]["text"] == alone["text"]


def test_batch_inference_counts_must_match(server):
    files, data = _batch_files([encode(make_image(32, 32))] * 2, [greedy("a", 2)])
    response = requests.post(f"{server.url}/v1/vision/batch-inference", files=files, data=data, timeout=30)
    assert response.status_code == 400
    assert "2 image_files but 1 entries" in response.json()["error"]


def test_batch_inference_item_limit(server):
    files, data = _batch_files([encode(make_image(28, 28))] * 17, [greedy("a", 1)] * 17)
    response = requests.post(f"{server.url}/v1/vision/batch-inference", files=files, data=data, timeout=30)
    assert response.status_code == 400
    assert "limit is 16" in response.json()["error"]


def test_health_and_model_info(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "healthy" and health["model_loaded"] is True
    assert health["device"] == "cpu" and health["queue_depth"] >= 0
    info = httpx.get(f"{server.url}/model/info").json()
    assert info["architecture"] == "Glm4vForConditionalGeneration"
    assert info["dtype"] == "float32" and info["parameter_count"] > 0
    assert info["model_config"]["text"]["num_hidden_layers"] == 2
    # On a CPU, decode steps run eagerly and one after another (compile, CUDA graphs and
    # overlapped steps are for a single GPU), each layer's queries, keys and values from one
    # matrix multiply.
    assert info["decode"] == {
        "compiled": False,
        "cuda_graphs": False,
        "cuda_graphs_captured": 0,
        "fused_qkv_layers": 2,
        "overlapped_steps": False,
    }


def test_bentoml_routes_are_kept(server):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert "bentoml_service_request" in httpx.get(f"{server.url}/metrics").text
    assert httpx.get(f"{server.url}/").status_code == 200  # Swagger UI
    paths = httpx.get(f"{server.url}/docs.json").json()["paths"]
    assert {"/v1/vision/inference", "/v1/vision/batch-inference", "/generate"} <= set(paths)


def test_sustained_concurrent_load_loses_no_request(server):
    """More than 100 self-calls in flight over time: BentoML's client recycling must not cut any."""
    image = encode(make_image(32, 32))

    def one(i: int) -> int:
        return post_inference(server.url, image, greedy(f"q{i}", 2 + i % 5)).status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(240)))
    assert codes == [200] * 240


@pytest.mark.parametrize("value", ["http://127.0.0.1:1/secret.jpg", "https://example.com/cat.jpg", "/etc/passwd"])
def test_text_in_a_file_field_is_refused_not_fetched(server, value):
    response = requests.post(f"{server.url}/v1/vision/inference", files={"image_file": (None, value)}, timeout=30)
    assert response.status_code == 400
    assert "must be an uploaded file" in response.text


def test_service_metrics_on_the_metrics_endpoint(server):
    generated = metric(server.url, "glm4v_generated_tokens_total")
    first_tokens = metric(server.url, "glm4v_time_to_first_token_seconds_count")
    invalid = metric(server.url, 'glm4v_rejections_total{reason="invalid_request"}')
    body = post_inference(server.url, encode(make_image(40, 40)), greedy("count me", 17)).json()
    assert body["usage"]["completion_tokens"] == 17
    post_inference(server.url, b"not an image")
    assert metric(server.url, "glm4v_generated_tokens_total") == generated + 17
    assert metric(server.url, "glm4v_time_to_first_token_seconds_count") == first_tokens + 1
    assert metric(server.url, 'glm4v_rejections_total{reason="invalid_request"}') == invalid + 1
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("glm4v_queue_depth", "glm4v_running_sequences", "glm4v_batch_occupancy_bucket",
                 "glm4v_inter_token_latency_seconds_bucket", "glm4v_prompt_tokens_total"):  # fmt: skip
        assert name in text, name
    # On a CPU neither fast path is on: the gauges say so (on a GPU, 0 would mean one was turned off).
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    for path in ("compiled", "cuda_graphs"):
        assert f'glm4v_decode_fast_path{{path="{path}"}} 0.0' in lines, path


def test_a_second_server_on_the_machine_leaves_this_ones_metrics_alone(server, tiny_model_dir, tmp_path):
    """Two servers on one machine (one per GPU, say) share BENTOML_HOME; each /metrics counts its own work."""
    image = encode(make_image(30, 30))
    post_inference(server.url, image, greedy("before the second starts", 5))
    before = metric(server.url, "glm4v_generated_tokens_total")
    assert before >= 5
    with Server(tiny_model_dir, tmp_path / "second.log") as second:
        post_inference(server.url, image, greedy("after the second started", 7))
        assert metric(server.url, "glm4v_generated_tokens_total") == before + 7
        assert metric(second.url, "glm4v_generated_tokens_total") == 0


def test_the_worker_sees_the_gpus_the_server_was_started_with(tiny_model_dir, tmp_path, monkeypatch):
    """BentoML showed the service's one worker only the first GPU (CUDA_VISIBLE_DEVICES=0, set on a
    CPU-only machine too): GLM4V_DEVICE=cuda:1 or a GLM4V_DEVICE_MAP over several GPUs could not work."""
    for name in ("CUDA_VISIBLE_DEVICES", "BENTOML_DISABLE_GPU_ALLOCATION"):  # as a plain shell starts it
        monkeypatch.delenv(name, raising=False)
    with Server(tiny_model_dir, tmp_path / "serve.log") as server:
        children = psutil.Process(server.process.pid).children(recursive=True)
        workers = [p for p in children if any("_bentoml_impl.worker" in part for part in p.cmdline())]
        assert len(workers) == 1
        assert "CUDA_VISIBLE_DEVICES" not in workers[0].environ()


def test_deterministic_answers_come_from_the_result_cache(server):
    image = encode(make_image(44, 44, (1, 2, 3)))
    request = {"text_prompt": "cache me", "max_tokens": 9, "ignore_eos": True}
    hits = metric(server.url, 'glm4v_result_cache_total{outcome="hit"}')
    first = post_inference(server.url, image, request).json()
    second = post_inference(server.url, image, request).json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["text"] == first["text"] and second["usage"] == first["usage"]
    assert metric(server.url, 'glm4v_result_cache_total{outcome="hit"}') == hits + 1
    opted_out = post_inference(server.url, image, {**request, "cache": False}).json()
    assert opted_out["cached"] is False and opted_out["text"] == first["text"]
    other_image = post_inference(server.url, encode(make_image(44, 44, (9, 9, 9))), request).json()
    assert other_image["cached"] is False  # the key covers the image bytes
    unseeded = {**request, "temperature": 0.8}
    assert [post_inference(server.url, image, unseeded).json()["cached"] for _ in range(2)] == [False, False]
    seeded = {**request, "temperature": 0.8, "seed": 3}
    assert [post_inference(server.url, image, seeded).json()["cached"] for _ in range(2)] == [False, True]
