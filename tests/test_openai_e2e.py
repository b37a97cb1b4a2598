"""The OpenAI-compatible API, called with the official `openai` client against the real `bentoml serve`."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import openai
import pytest
from conftest import encode, make_image

from glm4v_bento.devserver import Server

MODEL = "glm4v-tiny"
IMAGE_URI = "data:image/png;base64," + base64.b64encode(encode(make_image(56, 56))).decode()
IMAGE_PART = {"type": "image_url", "image_url": {"url": IMAGE_URI}}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with Server(
        tiny_model_dir,
        tmp_path_factory.mktemp("logs") / "serve.log",
        GLM4V_SERVED_MODEL_NAME=MODEL,
        # Even allowed hosts may not lead to loopback or private addresses.
        GLM4V_IMAGE_URL_ALLOWED_HOSTS="localhost,127.0.0.1",
    ) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def user(text: str, image: bool = True) -> dict:
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, IMAGE_PART)
    return {"role": "user", "content": content}


def collect(stream) -> tuple[str, str, list]:
    reasoning, content, chunks = "", "", list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    return reasoning, content, chunks


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_an_api_this_server_does_not_serve_says_which_it_does(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="glm4v-tiny", prompt="hi")  # the legacy completions API
    assert refused.value.body["code"] == "not_found"
    shown = str(refused.value)  # what the client's user reads
    assert "no route for POST /v1/completions" in shown and "POST /v1/chat/completions" in shown


def test_each_answer_carries_its_id_where_the_client_looks_for_a_request_id(client):
    completion = client.chat.completions.create(model=MODEL, messages=[user("x", image=False)], max_tokens=2)
    assert completion.id.startswith("chatcmpl-") and completion._request_id == completion.id
    stream = client.chat.completions.create(model=MODEL, messages=[user("x", image=False)], max_tokens=2, stream=True)
    assert stream.response.headers["x-request-id"] == next(iter(stream)).id
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[user("x")], max_tokens=2, temperature=9)
    assert info.value.request_id.startswith("chatcmpl-")  # an error too, to quote when reporting it


def test_a_body_that_is_not_an_object_is_named_as_such(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=[{"role": "user"}], timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body must be a JSON object"


def test_non_streamed_completion_with_a_data_uri_image(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[user("what is this?")], max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    usage = response.usage
    assert usage.completion_tokens == 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    text_only = client.chat.completions.create(model=MODEL, messages=[user("what is this?", image=False)], max_tokens=1)
    assert usage.prompt_tokens > text_only.usage.prompt_tokens  # the image's tokens are counted


def test_streamed_equals_non_streamed_for_a_greedy_request(client):
    request = {"model": MODEL, "messages": [user("describe")], "max_tokens": 40, "temperature": 0}
    whole = client.chat.completions.create(**request)
    reasoning, content, chunks = collect(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    message = whole.choices[0].message
    assert content == message.content
    assert reasoning == (getattr(message, "reasoning_content", None) or "")
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert chunks.index(finishing[0]) == len(chunks) - 2  # usage comes last, after the finish
    _, _, without_usage = collect(client.chat.completions.create(**request, stream=True))
    assert all(c.usage is None for c in without_usage)


def test_async_client_streamed_and_not(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        request = {"model": MODEL, "messages": [user("hello")], "max_tokens": 30, "temperature": 0}
        whole, stream = await asyncio.gather(
            client.chat.completions.create(**request), client.chat.completions.create(**request, stream=True)
        )
        content = ""
        async for chunk in stream:
            content += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        return whole, content

    whole, content = asyncio.run(run())
    assert content == whole.choices[0].message.content


def test_history_goes_back_without_its_thinking(client):
    def prompt_tokens(assistant_text: str) -> int:
        messages = [
            {"role": "system", "content": "Be brief."},
            user("first question"),
            {"role": "assistant", "content": assistant_text},
            user("and then?", image=False),
        ]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens

    with_thinking = prompt_tokens("<think>a long chain of private reasoning</think><answer>A house.</answer>")
    without = prompt_tokens("<answer>A house.</answer>")
    other = prompt_tokens("<answer>A much longer answer about a house.</answer>")
    assert with_thinking == without != other


def test_stop_strings(client):
    request = {"model": MODEL, "messages": [user("go")], "max_tokens": 40, "temperature": 0}
    full = client.chat.completions.create(**request).choices[0].message.content
    stop = full[8:11]
    stopped = client.chat.completions.create(**request, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert full.startswith(stopped.choices[0].message.content)


def test_logprobs_cover_every_generated_token_streamed_or_not(client):
    request = {"model": MODEL, "messages": [user("what is this?")], "max_tokens": 12, "temperature": 0}
    request |= {"logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    response = client.chat.completions.create(**request)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 12
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob  # the best alternative is at least as likely
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    plain = {key: value for key, value in request.items() if key not in ("logprobs", "top_logprobs")}
    assert client.chat.completions.create(**plain).choices[0].logprobs is None
    again = client.chat.completions.create(**request)  # not the plain answer, now in the result cache
    assert len(again.choices[0].logprobs.content) == 12

    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = [
        entry for chunk in chunks for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content
    ]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_n_choices_run_side_by_side_streamed_or_not(client):
    request = {"model": MODEL, "messages": [user("what is this?")], "max_tokens": 10, "n": 3}
    request |= {"temperature": 2.0, "seed": 7, "extra_body": {"ignore_eos": True}}

    def texts(choices) -> list[str]:
        return [(getattr(c.message, "reasoning_content", None) or "") + c.message.content for c in choices]

    response = client.chat.completions.create(**request)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    sampled = texts(response.choices)
    assert len(set(sampled)) > 1  # each choice draws with its own seed
    assert texts(client.chat.completions.create(**request).choices) == sampled  # and the seed repeats them
    assert response.usage.completion_tokens == 30 and response.usage.total_tokens == response.usage.prompt_tokens + 30

    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed, finished = ["", "", ""], {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += (getattr(choice.delta, "reasoning_content", None) or "") + (
                choice.delta.content or ""
            )
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert streamed == sampled and finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 30

    greedy = client.chat.completions.create(**{**request, "temperature": 0, "n": 2})
    assert len(set(texts(greedy.choices))) == 1


def test_frequency_and_presence_penalties_steer_away_from_repeats(client):
    request = {"model": MODEL, "messages": [user("what is this?", image=False)], "max_tokens": 24, "temperature": 0}
    request["extra_body"] = {"ignore_eos": True, "cache": False}

    def answer(**penalties) -> str:
        message = client.chat.completions.create(**request, **penalties).choices[0].message
        return (getattr(message, "reasoning_content", None) or "") + message.content

    plain = answer()
    assert answer(frequency_penalty=2.0) != plain
    assert answer(presence_penalty=2.0) != plain
    repeated = answer(frequency_penalty=-2.0)  # a negative penalty rewards repeats
    assert len(set(repeated)) < len(set(plain))


@pytest.mark.parametrize(
    ("overrides", "status", "param", "fragment"),
    [
        ({"n": 17}, 400, "n", "less than or equal"),
        ({"model": "gpt-4o"}, 404, "model", "does not exist"),
        ({"presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal"),
        ({"temperature": 5}, 400, "temperature", "less than or equal"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "last message"),
        ({"messages": []}, 400, "messages", "at least 1"),
        ({"logit_bias": {"1": 5}}, 400, "logit_bias", "not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "function calling"),
        ({"tool_choice": "required"}, 400, "tool_choice", "function calling"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format", "not constrained to JSON"),
        ({"store": True}, 400, "store", "stored completions"),
        ({"reasoning_effort": "low"}, 400, "reasoning_effort", "max_tokens caps"),
        ({"extra_body": {"temprature": 0}}, 400, "temprature", "unrecognized request argument"),
        ({"messages": [{"role": "system", "content": [IMAGE_PART]}, user("x")]}, 400, "messages.0.content", "images"),
        ({"top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "less than or equal"),
        ({"max_tokens": 10**6}, 400, None, "1000000 new tokens were asked for"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(client, overrides, status, param, fragment):
    request = {"model": MODEL, "messages": [user("x")], "max_tokens": 2, **overrides}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    error = info.value
    assert error.status_code == status
    assert error.body["param"] == param and fragment in error.body["message"]
    assert error.body["type"] == "invalid_request_error"
    if "not supported" in error.body["message"]:  # a feature this server lacks, told apart from a mistake
        assert error.body["code"] == "unsupported_parameter"


def test_parameters_that_ask_for_nothing_are_accepted_and_change_nothing(client):
    """What clients and frameworks send by default: the answer is the one without them."""

    def answer(messages: list[dict], **extra) -> str:
        response = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"cache": False}, **extra
        )
        return response.choices[0].message.content

    plain = answer([{"role": "system", "content": "be brief"}, user("what is this?")])
    defaults = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "store": False}
    defaults |= {"parallel_tool_calls": False, "metadata": {"team": "vision"}, "modalities": ["text"]}
    assert answer([{"role": "system", "content": "be brief"}, user("what is this?")], **defaults) == plain
    # OpenAI's newer name for system instructions
    assert answer([{"role": "developer", "content": "be brief"}, user("what is this?")]) == plain
    assert answer([user("what is this?")]) != plain  # the instructions do reach the prompt


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:1/cat.png", "non-public"),  # allowed host, loopback address
        ("http://localhost:1/cat.png", "non-public"),  # allowed name that resolves to loopback
        ("http://10.0.0.1/cat.png", "not allowed"),  # private address, not on the list
        ("http://169.254.169.254/latest/meta-data", "not allowed"),  # cloud metadata
        ("https://example.com/cat.png", "not allowed"),
        ("file:///etc/passwd", "data: URIs or http(s)"),
        ("data:image/png;base64,***", "not valid base64"),
    ],
)
def test_image_urls_are_refused_by_default_and_never_reach_inside(client, url, fragment):
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[message], max_tokens=2)
    assert fragment in info.value.body["message"]
    assert info.value.body["param"] == "messages.0.content.0.image_url"


@pytest.mark.parametrize("n", [1, 3])
def test_closing_a_stream_cancels_the_generation(client, server, n):
    stream = client.chat.completions.create(
        model=MODEL, messages=[user("long")], max_tokens=6000, stream=True, n=n, extra_body={"ignore_eos": True}
    )
    for index, _ in enumerate(stream):
        if index == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/health").json()["running"] != 0:
        assert time.monotonic() < deadline, "the closed stream kept generating"
        time.sleep(0.1)


def test_repeated_deterministic_requests_hit_the_result_cache(client):
    request = {"model": MODEL, "messages": [user("cache this one")], "max_tokens": 12, "temperature": 0}
    first = client.chat.completions.with_raw_response.create(**request)
    second = client.chat.completions.with_raw_response.create(**request)
    assert (first.headers["x-glm4v-cache"], second.headers["x-glm4v-cache"]) == ("miss", "hit")
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.parse().usage.total_tokens == first.parse().usage.total_tokens
    opted_out = client.chat.completions.with_raw_response.create(**request, extra_body={"cache": False})
    assert opted_out.headers["x-glm4v-cache"] == "miss"
