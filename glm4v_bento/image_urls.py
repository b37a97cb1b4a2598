"""Images named by URL in OpenAI-style messages: data URIs always, http(s) only when allowed.

A server that fetches URLs for its clients can be made to reach inside its own network
(cloud metadata, admin ports). So http(s) URLs are refused unless their host is on the
configured allow-list, and even then the fetch never connects to a loopback, private,
link-local or otherwise non-public address: the check runs on the addresses the name
resolves to, at connect time, for the first request and for every redirect. Size and time
are bounded.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import anyio
import httpcore


class ImageURLError(ValueError):
    """An image URL the server will not use; the message says why."""


@dataclass(frozen=True)
class URLPolicy:
    allowed_hosts: frozenset[str]
    max_bytes: int
    timeout_s: float
    max_redirects: int = 3
    allow_private_addresses: bool = False  # tests only: lets a loopback test server be reached


async def image_bytes(url: str, policy: URLPolicy) -> bytes:
    """The bytes behind a ``data:`` URI or an allowed http(s) URL."""
    if url.startswith("data:"):  # megabytes of base64: not on the event loop
        return await anyio.to_thread.run_sync(decode_data_uri, url, policy.max_bytes)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageURLError(f"image URLs must be data: URIs or http(s) URLs, not {scheme or 'relative'} ones")
    return await fetch(url, policy)


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ImageURLError("a data: URI image must be base64-encoded (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageURLError(f"the data: URI image is over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageURLError("the data: URI is not valid base64") from None


async def fetch(url: str, policy: URLPolicy) -> bytes:
    backend = _PublicAddressesOnly(policy.allow_private_addresses)
    timeouts = {"connect": policy.timeout_s, "read": policy.timeout_s, "write": policy.timeout_s, "pool": 1.0}
    try:
        with anyio.fail_after(policy.timeout_s * 2):
            async with httpcore.AsyncConnectionPool(
                network_backend=backend, ssl_context=ssl.create_default_context()
            ) as pool:
                for _ in range(policy.max_redirects + 1):
                    _check_host(url, policy.allowed_hosts)
                    async with pool.stream("GET", url, extensions={"timeout": timeouts}) as response:
                        if response.status in (301, 302, 303, 307, 308):
                            location = _header(response.headers, b"location")
                            if not location:
                                raise ImageURLError("the image URL redirected without a location")
                            url = urljoin(url, location)
                            continue
                        if response.status != 200:
                            raise ImageURLError(f"fetching the image URL gave HTTP {response.status}")
                        return await _read_limited(response, policy.max_bytes)
                raise ImageURLError(f"the image URL redirected more than {policy.max_redirects} times")
    except TimeoutError:
        raise ImageURLError(f"fetching the image URL took longer than {policy.timeout_s:g} s") from None
    except httpcore.TimeoutException:
        raise ImageURLError(f"fetching the image URL took longer than {policy.timeout_s:g} s") from None
    except (httpcore.ConnectError, httpcore.ProtocolError, httpcore.NetworkError) as exc:
        raise ImageURLError(f"the image URL could not be fetched ({_reason(exc)})") from None


def _check_host(url: str, allowed_hosts: Iterable[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageURLError("image URLs may only redirect to http(s) URLs")
    host = (parts.hostname or "").lower()
    if host not in allowed_hosts:
        allowed = ", ".join(sorted(allowed_hosts)) or "none"
        raise ImageURLError(
            f"image URLs from {host or 'this URL'} are not allowed (allowed hosts: {allowed}; "
            "set GLM4V_IMAGE_URL_ALLOWED_HOSTS, or send the image as a data: URI)"
        )


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


class _PublicAddressesOnly(httpcore.AsyncNetworkBackend):
    """Resolves names itself and connects only to public addresses (so DNS cannot point inside)."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        name = host.decode() if isinstance(host, bytes) else host
        try:
            infos = await anyio.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except OSError:
            raise httpcore.ConnectError(f"{name} could not be resolved") from None
        addresses = [info[4][0] for info in infos]
        refused = [a for a in addresses if not (self._allow_private or is_public(a))]
        if not addresses or refused:
            raise ImageURLError(f"image URLs may not point at non-public addresses ({name} -> {refused[0]})")
        return await self._inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise ImageURLError("image URLs may not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def _read_limited(response, max_bytes: int) -> bytes:
    declared = _header(response.headers, b"content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageURLError(f"the image at the URL is {int(declared):,} bytes; the limit is {max_bytes:,}")
    body = bytearray()
    async for chunk in response.aiter_stream():
        body += chunk
        if len(body) > max_bytes:
            raise ImageURLError(f"the image at the URL is over the limit of {max_bytes:,} bytes")
    return bytes(body)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
