"""Image URL fetching: allow-list, public addresses only, redirects re-checked, size and time bounded."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import pytest

from glm4v_bento.image_urls import ImageURLError, URLPolicy, decode_data_uri, image_bytes, is_public

PNG = b"\x89PNG fake image bytes"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        routes = {
            "/ok.png": (200, {}, PNG),
            "/big.png": (200, {}, b"x" * 5000),
            "/to-ok": (302, {"Location": "/ok.png"}, b""),
            "/to-elsewhere": (302, {"Location": "http://not-allowed.test/x.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b""),
        }
        if self.path == "/slow":
            time.sleep(2)
            status, headers, body = 200, {}, PNG
        else:
            status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def policy(**overrides) -> URLPolicy:
    # The test server lives on loopback, which the real policy never reaches: allowed here only.
    settings = {"allowed_hosts": frozenset({"127.0.0.1"}), "max_bytes": 1000, "timeout_s": 1.0}
    return URLPolicy(**{**settings, "allow_private_addresses": True, **overrides})


def fetch(url: str, **overrides) -> bytes:
    return asyncio.run(image_bytes(url, policy(**overrides)))


def refused(url: str, **overrides) -> str:
    with pytest.raises(ImageURLError) as info:
        fetch(url, **overrides)
    return str(info.value)


def test_fetches_an_allowed_url_and_follows_redirects(origin):
    assert fetch(f"{origin}/ok.png") == PNG
    assert fetch(f"{origin}/to-ok") == PNG


def test_a_redirect_must_stay_on_allowed_hosts(origin):
    assert "not-allowed.test" in refused(f"{origin}/to-elsewhere")


def test_redirect_loops_end(origin):
    assert "more than 3 times" in refused(f"{origin}/loop")


def test_size_and_time_limits(origin):
    assert "5,000 bytes; the limit is 1,000" in refused(f"{origin}/big.png")
    started = time.monotonic()
    assert "longer than 0.5 s" in refused(f"{origin}/slow", timeout_s=0.5)
    assert time.monotonic() - started < 1.9


def test_http_errors_are_reported(origin):
    assert "HTTP 404" in refused(f"{origin}/missing")


def test_loopback_is_refused_without_the_test_switch(origin):
    assert "non-public" in refused(f"{origin}/ok.png", allow_private_addresses=False)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_public_address_classification(address, public):
    assert is_public(address) is public


def test_data_uris():
    assert decode_data_uri("data:image/png;base64,aGVsbG8=", 100) == b"hello"
    with pytest.raises(ImageURLError, match="base64-encoded"):
        decode_data_uri("data:image/png,raw", 100)
    with pytest.raises(ImageURLError, match="limit"):
        decode_data_uri("data:image/png;base64," + "A" * 400, 100)
