"""The BentoML fixes: root-model schemas are generated once and handed out as copies; inputs
refuse fields their API does not have; each server keeps its metrics in a directory of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from glm4v_bento import bentoml_fixes


def test_root_model_schema_is_cached_and_copied(monkeypatch):
    from _bentoml_sdk.io_models import IORootModel, ensure_io_descriptor
    from pydantic import TypeAdapter

    from glm4v_bento.schemas import BatchItem

    bentoml_fixes.install()
    cls = ensure_io_descriptor(list[BatchItem])  # what BentoML builds for the batcher's input
    assert issubclass(cls, IORootModel)
    first = cls.model_json_schema()
    calls = []
    original = TypeAdapter.json_schema
    monkeypatch.setattr(TypeAdapter, "json_schema", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = cls.model_json_schema()
    assert second == first and second is not first  # same content, a fresh copy
    assert calls == []  # not generated again
    second["mutated"] = True
    assert "mutated" not in cls.model_json_schema()
    assert cls.model_validate_json(b'[{"request_id": "a"}]').root[0].request_id == "a"


def test_inputs_built_from_a_signature_refuse_other_fields_and_root_inputs_stay_as_they_are():
    from _bentoml_sdk.io_models import IODescriptor
    from pydantic import ValidationError

    bentoml_fixes.install()

    def api(prompt: str, cache: bool = True) -> str: ...

    named = IODescriptor.from_input(api)
    assert named(prompt="x").cache is True
    with pytest.raises(ValidationError, match="max_new_tokens"):
        named(prompt="x", max_new_tokens=3)

    def root_api(items: list[int], /) -> str: ...

    root = IODescriptor.from_input(root_api)
    assert root.model_validate([1, 2]).root == [1, 2]
    assert IODescriptor.model_config.get("extra") is None  # the base, and other models, are untouched


def test_each_server_gets_a_metrics_directory_of_its_own_unless_one_is_named(monkeypatch, tmp_path):
    import bentoml.serving

    bentoml_fixes.install()
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    first, second = bentoml.serving.ensure_prometheus_dir(), bentoml.serving.ensure_prometheus_dir()
    assert first != second
    assert all(Path(d).is_dir() and not any(Path(d).iterdir()) for d in (first, second))
    named = tmp_path / "metrics"
    named.mkdir()
    (named / "counter_1.db").write_bytes(b"stale")  # left by a server that ran before
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(named))
    assert bentoml.serving.ensure_prometheus_dir() == str(named)
    assert not any(named.iterdir())  # emptied, as BentoML empties its own


def test_a_request_whose_handling_fails_before_answering_fails_at_once_not_at_the_timeout():
    import asyncio
    import time

    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    bentoml_fixes.install()

    async def failing(scope, receive, send):
        raise ConnectionError("the rate limiter's Redis is down")

    async def slow(scope, receive, send):
        await asyncio.sleep(30)

    async def call(app, timeout: float) -> list[dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": "/v1/chat/completions", "headers": []}
        await TimeoutMiddleware(app, timeout=timeout)(scope, receive, send)
        return sent

    started = time.monotonic()
    with pytest.raises(ConnectionError, match="Redis is down"):  # the server turns it into a logged 500
        asyncio.run(call(failing, timeout=20))
    assert time.monotonic() - started < 5
    sent = asyncio.run(call(slow, timeout=0.2))
    assert sent[0]["status"] == 504
