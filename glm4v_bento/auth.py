"""API keys: when any are configured, every API needs ``Authorization: Bearer <key>``.

Keys come from GLM4V_API_KEYS (comma-separated) and/or GLM4V_API_KEYS_FILE (one per line,
``#`` comments). Probes stay open (orchestrators call them without keys), and so does the
API documentation; /metrics is open unless GLM4V_METRICS_REQUIRE_KEY is set. A key is never
logged: logs and limits name it by its id, ``key-`` + the first 8 hex digits of its SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path

from glm4v_bento.http_limits import ASGIApp, Receive, Scope, Send, is_internal, reply_error

OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/health", "/", "/docs.json", "/schema.json"})
OPEN_PREFIXES = ("/static_content/", "/assets/")


class KeyConfigError(ValueError):
    """The key configuration cannot be used (for example, the keys file is missing)."""


def load_keys(keys: list[str], keys_file: str | None) -> list[str]:
    found = [k.strip() for k in keys if k.strip()]
    if keys_file:
        path = Path(keys_file)
        if not path.is_file():
            raise KeyConfigError(f"GLM4V_API_KEYS_FILE={keys_file} does not exist")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class ApiKeyAuth:
    def __init__(
        self,
        app: ASGIApp,
        keys: list[str],
        protect_metrics: bool = False,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.on_reject = on_reject or (lambda reason: None)
        self._keys = [(key.encode(), key_id(key)) for key in keys]
        self._open = OPEN_PATHS if protect_metrics else OPEN_PATHS | {"/metrics"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or self._is_open(scope) or is_internal(scope):
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        matched = None
        for key, identity in self._keys:  # no early exit: the time taken says nothing about the keys
            if hmac.compare_digest(presented, key) and presented:
                matched = identity
        if matched is None:
            reason = "missing Authorization: Bearer <key> header" if not presented else "invalid API key"
            self.on_reject("unauthorized")
            await _unauthorized(scope, send, reason)
            return
        scope.setdefault("state", {})["glm4v_key_id"] = matched
        await self.app(scope, receive, send)

    def _is_open(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in self._open or path.startswith(OPEN_PREFIXES)


def _bearer(scope: Scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


async def _unauthorized(scope: Scope, send: Send, reason: str) -> None:
    challenge = [(b"www-authenticate", b'Bearer realm="glm4v"')]
    message = f"{reason}: this server requires an API key"
    await reply_error(scope, send, 401, message, code="invalid_api_key", headers=challenge)
