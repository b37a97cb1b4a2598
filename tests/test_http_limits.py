"""The request-limits middleware, driven as an ASGI app (no server needed)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from glm4v_bento.http_limits import INTERNAL_HEADER, INTERNAL_TOKEN, RequestLimits


class SlowApp:
    """Reads the whole body, waits until released, answers 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def __call__(self, scope, receive, send):
        self.started += 1
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_concurrency_limit_refuses_with_429_and_lets_probes_and_internal_calls_through():
    async def scenario():
        inner = SlowApp()
        app = RequestLimits(inner, max_concurrency=2, max_body_bytes=1000)
        async with client(app) as http:
            running = [asyncio.create_task(http.post("/v1/vision/inference", content=b"x")) for _ in range(2)]
            while inner.started < 2:
                await asyncio.sleep(0.01)
            refused = await http.post("/v1/vision/inference", content=b"x")
            internal = asyncio.create_task(
                http.post("/v1/batch/generate", content=b"x", headers={INTERNAL_HEADER: INTERNAL_TOKEN})
            )
            forged = await http.post("/v1/batch/generate", content=b"x", headers={INTERNAL_HEADER: "guess"})
            probe = asyncio.create_task(http.get("/health"))
            while inner.started < 4:
                await asyncio.sleep(0.01)
            inner.release.set()
            done = await asyncio.gather(*running, internal, probe)
        return refused, forged, done, app.active

    refused, forged, done, active = asyncio.run(scenario())
    assert refused.status_code == 429 and "limit 2" in refused.json()["error"] and refused.headers["retry-after"]
    assert forged.status_code == 429
    assert [r.status_code for r in done] == [200, 200, 200, 200]
    assert active == 0  # every slot was given back


@pytest.mark.parametrize("chunked", [False, True])
def test_body_limit_gives_413(chunked):
    async def scenario():
        inner = SlowApp()
        inner.release.set()
        app = RequestLimits(inner, max_concurrency=4, max_body_bytes=100)

        async def chunks():
            for _ in range(5):
                yield b"x" * 50

        async with client(app) as http:
            body = chunks() if chunked else b"x" * 250
            big = await http.post("/v1/vision/inference", content=body)
            small = await http.post("/v1/vision/inference", content=b"x" * 50)
        return big, small

    big, small = asyncio.run(scenario())
    assert big.status_code == 413 and "100" in big.json()["error"]
    assert small.status_code == 200


def test_openai_routes_get_openai_shaped_refusals():
    async def scenario():
        app = RequestLimits(SlowApp(), max_concurrency=4, max_body_bytes=10)
        async with client(app) as http:
            return await http.post("/v1/chat/completions", content=b"x" * 100)

    response = asyncio.run(scenario())
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "limit" in error["message"]


def test_a_body_that_stops_arriving_gets_408_and_its_place_back_while_a_slow_one_goes_on():
    async def scenario():
        inner = SlowApp()
        inner.release.set()
        app = RequestLimits(inner, max_concurrency=1, max_body_bytes=10_000, body_timeout_s=0.3)

        async def stalls():
            yield b"x" * 10
            await asyncio.sleep(30)  # the client stops sending
            yield b"never"

        async def slow_but_steady():
            for _ in range(8):  # 0.8 s in all, but never 0.3 s without a byte
                await asyncio.sleep(0.1)
                yield b"x" * 10

        async with client(app) as http:
            stalled = await asyncio.wait_for(http.post("/v1/vision/inference", content=stalls()), 5)
            slow = await http.post("/v1/vision/inference", content=slow_but_steady())
        return stalled, slow, app.active

    stalled, slow, active = asyncio.run(scenario())
    assert stalled.status_code == 408 and "no bytes for 0.3 s" in stalled.json()["error"]
    assert stalled.headers["connection"] == "close"
    assert slow.status_code == 200 and active == 0
