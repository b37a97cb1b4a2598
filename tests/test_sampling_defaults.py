"""Sampling defaults: a request's unset sampling fields take the checkpoint's recommendation
(its generation_config), the way ``model.generate()`` would; GLM4V_SAMPLING_DEFAULTS=greedy
overrides it. Checked from the config file to the engine's tokens and the result cache."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest
from conftest import host_for
from transformers import GenerationConfig

from glm4v_bento.devserver import Server
from glm4v_bento.engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingDefaults,
    SamplingParams,
    load_model,
)
from glm4v_bento.engine.loader import sampling_defaults
from glm4v_bento.result_cache import MemoryResultCache
from glm4v_bento.schemas import BatchItem


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, SamplingDefaults()),
        ({"temperature": 0.7, "top_p": 0.9}, SamplingDefaults()),  # values without do_sample: greedy, as generate()
        ({"repetition_penalty": 1.1}, SamplingDefaults(repetition_penalty=1.1)),  # applies to greedy too
        ({"do_sample": True}, SamplingDefaults(temperature=1.0)),  # no implicit top-k of 50
        (
            {"do_sample": True, "temperature": 0.8, "top_p": 0.6, "top_k": 2, "repetition_penalty": 1.05},
            SamplingDefaults(temperature=0.8, top_p=0.6, top_k=2, repetition_penalty=1.05),
        ),
    ],
)
def test_defaults_follow_what_the_generation_config_says(config, expected):
    assert sampling_defaults(GenerationConfig(**config)) == expected


def test_settings_no_request_could_ask_for_fall_back_to_greedy(caplog):
    assert sampling_defaults(GenerationConfig(do_sample=True, top_p=0.0, temperature=0.7)) == SamplingDefaults()
    assert "ignoring the checkpoint's sampling settings" in caplog.text


def test_unset_fields_take_the_defaults_and_set_ones_win():
    defaults = SamplingDefaults(temperature=0.8, top_k=2)
    resolved = SamplingParams(top_p=0.5).with_defaults(defaults)
    assert (resolved.temperature, resolved.top_p, resolved.top_k, resolved.repetition_penalty) == (0.8, 0.5, 2, 1.0)
    assert SamplingParams(temperature=0).with_defaults(defaults).greedy  # asking for greedy gets greedy


@pytest.fixture(scope="module")
def sampling_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny model, with a generation_config that samples (as a chat checkpoint's may)."""
    path = tmp_path_factory.mktemp("sampling") / "model"
    shutil.copytree(tiny_model_dir, path)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.update(do_sample=True, temperature=0.8, top_k=5)
    config_file.write_text(json.dumps(config))
    return path


def test_the_loader_reads_the_checkpoints_defaults(sampling_checkpoint, loaded_model):
    assert load_model(str(sampling_checkpoint), device="cpu").sampling_defaults == SamplingDefaults(
        temperature=0.8, top_k=5
    )
    assert loaded_model.sampling_defaults == SamplingDefaults()  # the tiny demo model's config does not sample


def test_the_engine_samples_unset_fields_with_the_defaults(loaded_model):
    def text(engine: Engine, **params) -> str:
        request = GenerationRequest("roll", params=SamplingParams(max_new_tokens=16, ignore_eos=True, **params))
        return engine.generate([request])[0].text

    hot = Engine(loaded_model, sampling_defaults=SamplingDefaults(temperature=5.0))
    try:
        unset = text(hot, seed=1)
        assert unset == text(hot, seed=1, temperature=5.0)  # the default is what ran
        greedy = text(hot, temperature=0.0)
    finally:
        hot.close()
    plain = Engine(loaded_model)
    try:
        assert text(plain) == greedy  # explicit greedy on one, the model's greedy default on the other
    finally:
        plain.close()
    assert unset != greedy  # 16 draws at temperature 5 all matching the argmax: not a real chance


def _ask(host, request_id: str, **params) -> GenerationResult:
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, **params)
    [outcome] = asyncio.run(host.run_batch([BatchItem(request_id=request_id, prompt="same question", params=params)]))
    assert outcome.status == 200, outcome.error
    return outcome.result


@pytest.mark.parametrize("setting", ["model", "greedy"])
def test_info_and_result_cache_follow_the_defaults_in_effect(sampling_checkpoint, setting):
    host = host_for(str(sampling_checkpoint), sampling_defaults=setting)
    try:
        assert host.wait_ready(60), host.error
        host.cache = MemoryResultCache(10_000_000)
        samples = setting == "model"
        expected = SamplingDefaults(temperature=0.8, top_k=5) if samples else SamplingDefaults()
        assert host.model_info()["sampling_defaults"] == expected.model_dump()
        _ask(host, "a")
        # Sampled by default: a repeat is a new draw, never the stored one. Greedy: a cache hit.
        assert _ask(host, "b").cached is not samples
        _ask(host, "c", seed=3)
        assert _ask(host, "d", seed=3).cached  # seeded: deterministic either way
    finally:
        host.close()


@pytest.fixture(scope="module")
def sampling_server(sampling_checkpoint, tmp_path_factory):
    with Server(sampling_checkpoint, tmp_path_factory.mktemp("logs") / "serve.log") as server:
        yield server


def test_served_requests_without_sampling_fields_follow_the_checkpoint(sampling_server):
    """Through `bentoml serve` and the `openai` client: a request that names no temperature is
    sampled as the checkpoint says (so never answered from the cache); temperature=0 is greedy."""
    info = httpx.get(f"{sampling_server.url}/model/info").json()
    assert info["sampling_defaults"] == SamplingDefaults(temperature=0.8, top_k=5).model_dump()
    client = openai.OpenAI(base_url=f"{sampling_server.url}/v1", api_key="unused", max_retries=0)
    [model] = [m.id for m in client.models.list()]

    def cache(**params) -> str:
        messages = [{"role": "user", "content": "the same question"}]
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=4, **params)
        return raw.headers["X-GLM4V-Cache"]

    assert [cache(), cache()] == ["miss", "miss"]  # each is a new draw
    assert [cache(temperature=0), cache(temperature=0)] == ["miss", "hit"]
