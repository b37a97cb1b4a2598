"""Send many requests at once with aiohttp; the server batches them together.

    python examples/async_concurrent_client.py [URL] [CONCURRENCY]   (start the server first: make demo)

Compare the wall time with CONCURRENCY=1 to see what adaptive batching buys.
"""

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:3000"
CONCURRENCY = int(sys.argv[2]) if len(sys.argv) > 2 else 16
IMAGE = (Path(__file__).parent / "images" / "house.jpg").read_bytes()


async def one(session: aiohttp.ClientSession, index: int) -> tuple[int, float, int]:
    form = aiohttp.FormData()
    form.add_field("image_file", IMAGE, filename="house.jpg", content_type="image/jpeg")
    form.add_field("request_data", json.dumps({"text_prompt": f"Question {index}: what do you see?", "max_tokens": 64}))
    started = time.perf_counter()
    async with session.post(f"{URL}/v1/vision/inference", data=form) as response:
        body = await response.json()
    tokens = body.get("usage", {}).get("completion_tokens", 0) if response.status == 200 else 0
    return response.status, time.perf_counter() - started, tokens


async def main() -> None:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(session, i) for i in range(CONCURRENCY)))
        wall = time.perf_counter() - started
    statuses = sorted({status for status, _, _ in results})
    latencies = sorted(latency for _, latency, _ in results)
    tokens = sum(t for _, _, t in results)
    print(f"{CONCURRENCY} requests in {wall:.2f} s, statuses {statuses}, {tokens} tokens generated")
    print(f"latency p50 {latencies[len(latencies) // 2]:.2f} s, max {latencies[-1]:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
