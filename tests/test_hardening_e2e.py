"""API keys and shared rate limits through the real `bentoml serve` (and a real Redis)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import openai
import pytest
import requests
from conftest import encode, make_image, metric

from glm4v_bento.auth import key_id
from glm4v_bento.devserver import Server

KEY, OTHER_KEY = "sk-test-alpha-0123456789", "sk-test-beta-9876543210"


def infer(url: str, key: str | None = None, tokens: int = 3) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    files = {
        "image_file": ("a.png", encode(make_image(32, 32)), "image/png"),
        "request_data": (None, json.dumps({"text_prompt": "x", "max_tokens": tokens})),
    }
    return requests.post(f"{url}/v1/vision/inference", files=files, headers=headers, timeout=60)


def access_lines(server: Server, until: Callable[[list[dict]], bool]) -> list[dict]:
    """The server's access-log lines once ``until`` holds for them (or after 10 s): a request's line
    is written just after its response has gone out, so it may come a moment after the client's read."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{") and '"route"' in line]
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def any_with(lines: list[dict], request_id: str) -> bool:
    return any(line.get("request_id") == request_id for line in lines)


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyed")
    keys_file = folder / "keys.txt"
    keys_file.write_text(f"# one key per line\n{OTHER_KEY}\n")
    with Server(
        tiny_model_dir,
        folder / "serve.log",
        GLM4V_API_KEYS=KEY,
        GLM4V_API_KEYS_FILE=str(keys_file),
        GLM4V_SERVED_MODEL_NAME="glm4v-tiny",
    ) as srv:
        yield srv


def test_apis_need_a_valid_key(keyed):
    missing = infer(keyed.url)
    assert missing.status_code == 401 and "missing Authorization" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = infer(keyed.url, "sk-wrong")
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]
    assert infer(keyed.url, KEY).status_code == 200
    assert infer(keyed.url, OTHER_KEY).status_code == 200  # from the keys file


def test_probes_metrics_and_docs_stay_open(keyed):
    for path in ("/readyz", "/livez", "/health", "/metrics", "/docs.json"):
        assert requests.get(f"{keyed.url}{path}", timeout=10).status_code == 200, path


def test_openai_clients_get_openai_shaped_401(keyed):
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert info.value.body["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["glm4v-tiny"]


def test_keys_never_reach_the_log(keyed):
    infer(keyed.url, KEY)
    infer(keyed.url, "sk-wrong-but-secret")
    log = keyed.log()
    assert KEY not in log and OTHER_KEY not in log and "sk-wrong-but-secret" not in log


def test_two_replicas_share_one_rate_limit_through_redis(tiny_model_dir, tmp_path, redis_url):
    limits = {"GLM4V_REDIS_URL": redis_url, "GLM4V_RATE_LIMIT_RPM": "4"}
    replicas = [Server(tiny_model_dir, tmp_path / f"serve{i}.log", **limits) for i in range(2)]
    try:
        for replica in replicas:
            replica.wait_ready()
        first = infer(replicas[0].url)
        time.sleep(0.3)  # the answer is written to Redis just after it is sent
        second = infer(replicas[1].url)  # the same deterministic request, on the other replica
        assert (first.json()["cached"], second.json()["cached"]) == (False, True)  # one shared cache
        codes = [infer(replicas[i % 2].url).status_code for i in range(3)]
        assert codes == [200, 200, 429]  # 4 per minute across both replicas
        refused = infer(replicas[1].url)
        assert refused.status_code == 429
        assert "4 requests per minute" in refused.json()["error"] and int(refused.headers["retry-after"]) >= 1
        assert requests.get(f"{replicas[0].url}/health", timeout=10).status_code == 200  # probes are not limited
    finally:
        for replica in replicas:
            replica.stop()


THIRD_KEY, FOURTH_KEY, FIFTH_KEY = "sk-test-gamma-1111111111", "sk-test-delta-2222222222", "sk-test-eps-3333333333"


@pytest.fixture(scope="module")
def tpm_limited(tiny_model_dir, tmp_path_factory):
    """20 generated tokens per minute per key; each test spends its own keys."""
    keys = ",".join((KEY, OTHER_KEY, THIRD_KEY, FOURTH_KEY, FIFTH_KEY))
    log = tmp_path_factory.mktemp("tpm") / "serve.log"
    with Server(tiny_model_dir, log, GLM4V_RATE_LIMIT_TPM="20", GLM4V_API_KEYS=keys) as srv:
        yield srv


def batch_generate(url: str, key: str, tokens: int) -> requests.Response:
    """The batched API, called directly (through BentoML's adaptive batcher)."""
    params = {"max_new_tokens": tokens, "ignore_eos": True}
    body = {"items": [{"request_id": "mine", "prompt": "x", "params": params, "cache": False}]}
    return requests.post(f"{url}/v1/batch/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_generated_tokens_per_minute_are_charged(tpm_limited):
    first = infer(tpm_limited.url, KEY, tokens=30)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 30
    refused = infer(tpm_limited.url, KEY, tokens=1)  # 30 generated against 20 per minute: in debt
    assert refused.status_code == 429
    assert "20 generated tokens per minute" in refused.json()["error"]


def test_the_batched_api_charges_each_caller_for_its_own_tokens(tpm_limited):
    # The batcher runs in a task started by the first request it saw: that caller must not pay for the others.
    assert batch_generate(tpm_limited.url, OTHER_KEY, 2).status_code == 200
    big = batch_generate(tpm_limited.url, THIRD_KEY, 30)
    assert big.status_code == 200 and big.json()[0]["result"]["usage"]["completion_tokens"] == 30
    assert batch_generate(tpm_limited.url, THIRD_KEY, 1).status_code == 429
    assert batch_generate(tpm_limited.url, OTHER_KEY, 1).status_code == 200


def test_a_client_that_leaves_its_stream_still_pays_for_the_tokens_it_had(tpm_limited):
    url = tpm_limited.url
    cancelled = 'glm4v_requests_total{finish_reason="cancelled"}'
    before = metric(url, cancelled)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=FOURTH_KEY, max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=5000,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for received, _ in enumerate(stream, start=1):
        if received == 30:  # 30 tokens in, the client goes away
            break
    stream.close()
    deadline = time.monotonic() + 30
    while metric(url, cancelled) < before + 1:  # the generation stopped and was counted
        assert time.monotonic() < deadline, "the abandoned stream was never counted"
        time.sleep(0.05)
    refused = batch_generate(url, FOURTH_KEY, 1)
    assert refused.status_code == 429 and "20 generated tokens per minute" in refused.text
    # Its access-log line says the client left in the middle; a stream read to its end does not.
    fresh = openai.OpenAI(base_url=f"{url}/v1", api_key=FIFTH_KEY, max_retries=0)  # one not in debt
    whole = fresh.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=3,
    )  # fmt: skip
    assert len(list(whole)) > 1
    cut_id, whole_id = stream.response.headers["x-request-id"], whole.response.headers["x-request-id"]
    lines = access_lines(tpm_limited, lambda lines: any_with(lines, cut_id) and any_with(lines, whole_id))
    by_id = {line.get("request_id"): line for line in lines}
    assert by_id[cut_id]["status"] == 200 and by_id[cut_id].get("client_left") is True
    # ...with the tokens it is charged for: its 30 and whatever ran before the generation stopped.
    assert by_id[cut_id]["finish_reason"] == "cancelled" and by_id[cut_id]["completion_tokens"] >= 30
    assert "client_left" not in by_id[whole_id] and by_id[whole_id]["completion_tokens"] == 3


def test_one_json_log_line_per_request_without_prompts_or_keys(keyed):
    secret_prompt = "my-private-prompt-7f3a"
    headers = {"Authorization": f"Bearer {KEY}"}
    files = {
        "image_file": ("a.png", encode(make_image(32, 32)), "image/png"),
        "request_data": (None, json.dumps({"text_prompt": secret_prompt, "max_tokens": 5, "ignore_eos": True})),
    }
    response = requests.post(f"{keyed.url}/v1/vision/inference", files=files, headers=headers, timeout=60)
    request_id = response.json()["request_id"]
    infer(keyed.url, "sk-wrong")
    lines = access_lines(keyed, lambda lines: any_with(lines, request_id) and lines[-1]["status"] == 401)
    [mine] = [line for line in lines if line.get("request_id") == request_id]
    assert mine["route"] == "/v1/vision/inference" and mine["status"] == 200 and mine["method"] == "POST"
    assert mine["key_id"] == key_id(KEY) and mine["completion_tokens"] == 5 and mine["prompt_tokens"] > 0
    assert mine["duration_s"] > 0 and mine["finish_reason"] == "length"
    assert any(line["status"] == 401 and line["key_id"] is None for line in lines)
    assert secret_prompt not in keyed.log()


def test_log_lines_carry_the_servers_request_id_and_the_one_a_gateway_sent(keyed):
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    completion = client.chat.completions.create(
        model="glm4v-tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        extra_headers={"X-Request-ID": "envoy-7d1c"},
    )
    lines = access_lines(keyed, lambda lines: any_with(lines, completion.id))
    [mine] = [line for line in lines if line.get("request_id") == completion.id]
    assert mine["client_request_id"] == "envoy-7d1c"
    assert mine["route"] == "/v1/chat/completions" and mine["completion_tokens"] == 4
