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
import io
import json
import statistics
import sys
import tempfile
import time
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


async def _client(
    http: httpx.AsyncClient, url: str, images: list[bytes], count: int, latencies: list, cache: bool = False
) -> None:
    files = [("image_files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    entry = {"text_prompt": "describe", "max_tokens": 1, "ignore_eos": True, "cache": cache}
    data = {"batch_request": json.dumps({"requests": [entry] * len(images)})}
    for _ in range(count):
        started = time.perf_counter()
        response = await http.post(f"{url}/v1/vision/batch-inference", files=files, data=data)
        response.raise_for_status()
        if any(r["status"] != "success" for r in response.json()["results"]):
            raise RuntimeError(f"an item failed: {response.text[:300]}")
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
        await _client(http, url, images, 1, [], args.cache)  # warm the path
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(http, url, stop, probe_latencies))
        started = time.perf_counter()
        await asyncio.gather(
            *(_client(http, url, images, args.requests, batch_latencies, args.cache) for _ in range(args.clients))
        )
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
            f"{args.requests} `/v1/vision/batch-inference` requests of {args.images} photo-like "
            f"{args.side}x{args.side} PNGs (about {upload_kib} KiB each), 1 new token per item; meanwhile a "
            "probe asks `/health` every 20 ms (answered on the same event loop). Result cache: "
            + ("on (every timed item is a cache hit)." if args.cache else "off."),
            "",
            "| measure | value |",
            "|---|---:|",
            f"| images/s | {row['images_per_s']:.1f} |",
            f"| batch request p50 (ms) | {row['batch_p50'] * 1000:.0f} |",
            f"| /health p50 (ms) | {row['probe_p50']:.1f} |",
            f"| /health p99 (ms) | {row['probe_p99']:.1f} |",
            f"| /health max (ms) | {row['probe_max']:.1f} |",
            f"<!-- {SECTION}:end -->",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id or model-store tag")
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
