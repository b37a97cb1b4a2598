"""Large uploads through `bentoml serve`: batch throughput, and how long other requests wait meanwhile.

Clients send /v1/vision/batch-inference requests, each with several large photo-like images
(PNG, so decoding costs what a real upload costs) and one new token, so that the image work
dominates. Meanwhile a probe asks /health every 20 ms: the server answers it on the same event
loop, so its latency shows any time that loop was blocked (by image decoding, say).

    python bench/image_upload_bench.py --model .models/tiny --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.devserver import Server

SECTION = "image-uploads"


def photo_like(side: int, seed: int) -> bytes:
    """A PNG that compresses like a photo: smooth gradients plus noise (a flat image decodes too fast)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    pixels = ramp[None, :, None] + ramp[:, None, None] * 0.2 + rng.normal(0, 12, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


Send = Callable[[httpx.AsyncClient, str], Awaitable[None]]


def _native(images: list[bytes], cache: bool, model: str) -> Send:
    """/v1/vision/batch-inference requests: an item per image."""
    files = [("image_files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    entry = {"text_prompt": "describe", "max_tokens": 1, "ignore_eos": True, "cache": cache}
    data = {"batch_request": json.dumps({"requests": [entry] * len(images)})}

    async def send(http: httpx.AsyncClient, url: str) -> None:
        response = await http.post(f"{url}/v1/vision/batch-inference", files=files, data=data)
        response.raise_for_status()
        if any(r["status"] != "success" for r in response.json()["results"]):
            raise RuntimeError(f"an item failed: {response.text[:300]}")

    return send


def _openai(images: list[bytes], cache: bool, model: str) -> Send:
    """/v1/chat/completions requests: every image in one message, as data: URIs. The body is
    encoded once here, so the clients' own event loop has no work that would delay the probe."""
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
             for i in images]  # fmt: skip
    message = {"role": "user", "content": [*parts, {"type": "text", "text": "describe"}]}
    body = json.dumps({"model": model, "messages": [message], "max_tokens": 1, "temperature": 0, "cache": cache})
    content = body.encode()

    async def send(http: httpx.AsyncClient, url: str) -> None:
        headers = {"content-type": "application/json"}
        (await http.post(f"{url}/v1/chat/completions", content=content, headers=headers)).raise_for_status()

    return send


APIS = {"native": _native, "openai": _openai}
ROUTES = {"native": "`/v1/vision/batch-inference` (an item per image)", "openai": "`/v1/chat/completions` (data: URIs)"}


async def _client(http: httpx.AsyncClient, url: str, send: Send, count: int, latencies: list) -> None:
    for _ in range(count):
        started = time.perf_counter()
        await send(http, url)
        latencies.append(time.perf_counter() - started)


async def _probe(http: httpx.AsyncClient, url: str, stop: asyncio.Event, latencies: list) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        (await http.get(f"{url}/health")).raise_for_status()
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(0.02)


async def measure(url: str, args: argparse.Namespace) -> dict:
    images = [photo_like(args.side, seed) for seed in range(args.images)]
    batch_latencies: list[float] = []
    probe_latencies: list[float] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.clients + 4)) as http:
        model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
        send = APIS[args.api](images, args.cache, model)
        await _client(http, url, send, 1, [])  # warm the path
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(http, url, stop, probe_latencies))
        started = time.perf_counter()
        await asyncio.gather(*(_client(http, url, send, args.requests, batch_latencies) for _ in range(args.clients)))
        wall = time.perf_counter() - started
        stop.set()
        await probe
    probe_latencies.sort()
    return {
        "images_per_s": len(batch_latencies) * args.images / wall,
        "batch_p50": statistics.median(batch_latencies),
        "probe_p50": statistics.median(probe_latencies) * 1000,
        "probe_p99": probe_latencies[int(0.99 * (len(probe_latencies) - 1))] * 1000,
        "probe_max": probe_latencies[-1] * 1000,
    }


def render(row: dict, args: argparse.Namespace, upload_kib: int) -> str:
    return "\n".join(
        [
            f"<!-- {SECTION}:start -->",
            "## Large uploads: throughput, and the wait of other requests",
            "",
            f"`bench/image_upload_bench.py`, {date.today().isoformat()}, model `{args.model}`, through "
            f"`bentoml serve` on this machine ({args.machine}). {args.clients} clients each send "
            f"{args.requests} {ROUTES[args.api]} requests of {args.images} photo-like "
            f"{args.side}x{args.side} PNGs (about {upload_kib} KiB each), 1 new token; meanwhile a "
            "probe asks `/health` every 20 ms (answered on the same event loop). Result cache: "
            + ("on (every timed item is a cache hit)." if args.cache else "off."),
            "",
            "| measure | value |",
            "|---|---:|",
            f"| images/s | {row['images_per_s']:.1f} |",
            f"| request p50 (ms) | {row['batch_p50'] * 1000:.0f} |",
            f"| /health p50 (ms) | {row['probe_p50']:.1f} |",
            f"| /health p99 (ms) | {row['probe_p99']:.1f} |",
            f"| /health max (ms) | {row['probe_max']:.1f} |",
            f"<!-- {SECTION}:end -->",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id or model-store tag")
    parser.add_argument(
        "--api", choices=sorted(APIS), default="native", help="native: batch-inference; openai: chat completions"
    )
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--side", type=int, default=2048, help="image side in pixels")
    parser.add_argument(
        "--cache", action="store_true", help="use the result cache: after the first, every item is a cache hit"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.machine = cpu_name()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    with Server(args.model, log, GLM4V_MAX_CONCURRENCY="256") as server:
        row = asyncio.run(measure(server.url, args))
    publish(render(row, args, len(photo_like(args.side, 0)) // 1024), args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
