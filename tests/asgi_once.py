"""One HTTP request through an ASGI app, for middleware tests: the client has gone (every
receive says so) and whatever is sent goes nowhere."""

from __future__ import annotations

import asyncio


async def call_once(app, path: str, timeout_s: float = 10) -> None:
    scope = {"type": "http", "path": path, "method": "POST", "headers": [], "state": {}}

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        pass

    await asyncio.wait_for(app(scope, receive, send), timeout_s)
