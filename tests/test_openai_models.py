"""GET /v1/models/{id} with the official client, for a hub id (which holds a slash): routes alone."""

from __future__ import annotations

import openai
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from glm4v_bento.image_urls import URLPolicy
from glm4v_bento.openai_api import create_routes

HUB_ID = "zai-org/GLM-4.1V-9B-Thinking"


@pytest.fixture
def client():
    policy = URLPolicy(allowed_hosts=frozenset(), max_bytes=1, timeout_s=1.0)
    app = Starlette(routes=create_routes(lambda: None, HUB_ID, policy))  # no model needed to name it
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=TestClient(app))


def test_a_hub_id_is_retrieved_as_listed(client):
    assert client.models.retrieve(HUB_ID).model_dump() == client.models.list().data[0].model_dump()


def test_another_model_is_not_found_in_openais_error_shape(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("zai-org/GLM-4.5V")
    assert info.value.body["code"] == "model_not_found" and HUB_ID in info.value.body["message"]
