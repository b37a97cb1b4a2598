"""Service throughput: requests/s and latency through the real `bentoml serve`, batching on vs off.

Starts the service on the same model in three set-ups: no batching at all (BentoML's adaptive
batching off and one row at a time in the engine: each request runs alone), BentoML's
adaptive batching over the static engine batcher, and the default (adaptive batching over the
continuous scheduler). At each concurrency,
that many closed-loop clients send /v1/vision/inference requests back to back (one image,
greedy, exactly --max-tokens new tokens). The table goes to stdout and, with --output,
into a marked section of a Markdown file.

    python bench/service_bench.py --model .models/tiny --output docs/benchmarks.md
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.devserver import Server

SECTION = "service-throughput"


def _image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _client(http: httpx.AsyncClient, url: str, count: int, tokens: int, latencies: list, errors: list) -> None:
    image = _image()
    data = {
        "request_data": json.dumps(
            {"text_prompt": "describe", "max_tokens": tokens, "ignore_eos": True, "cache": False}
        )
    }
    for _ in range(count):
        started = time.perf_counter()
        response = await http.post(f"{url}/v1/vision/inference", files={"image_file": ("a.png", image)}, data=data)
        if response.status_code == 200:
            latencies.append(time.perf_counter() - started)
        else:
            errors.append(response.status_code)


async def measure(url: str, concurrency: int, requests_per_client: int, tokens: int) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await _client(http, url, 2, tokens, [], [])  # warm the path
        started = time.perf_counter()
        await asyncio.gather(
            *(_client(http, url, requests_per_client, tokens, latencies, errors) for _ in range(concurrency))
        )
        wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests: {sorted(set(errors))}")
    latencies.sort()
    return {
        "concurrency": concurrency,
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


SETUPS = {
    "off": {"GLM4V_ADAPTIVE_BATCHING": "false", "GLM4V_MAX_RUNNING": "1"},
    "adaptive + static engine": {"GLM4V_SCHEDULER": "static"},
    "adaptive + continuous (default)": {},
}


def run_server(model: str, setup: str, args: argparse.Namespace) -> list[dict]:
    log = Path(tempfile.mkdtemp()) / "serve.log"
    server = Server(model, log, GLM4V_MAX_CONCURRENCY="256", **SETUPS[setup])
    try:
        server.wait_ready()
        rows = []
        for concurrency in args.concurrency:
            print(f"# {setup}, concurrency {concurrency} ...", file=sys.stderr)
            per_client = max(2, args.requests // concurrency)
            rows.append(asyncio.run(measure(server.url, concurrency, per_client, args.max_tokens)))
        return rows
    finally:
        server.stop()


def render(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = [
        f"<!-- {SECTION}:start -->",
        "## Service throughput: batching on vs off",
        "",
        f"`bench/service_bench.py`, {date.today().isoformat()}, model `{args.model}`, through `bentoml serve` "
        f"on this machine ({args.machine}). Each request: one 64x48 image, greedy, exactly {args.max_tokens} "
        "new tokens, result cache off; closed-loop clients (each sends its next request when the last one returns). "
        "Off = no batching anywhere (`GLM4V_ADAPTIVE_BATCHING=false GLM4V_MAX_RUNNING=1`: each request "
        "runs alone); the ratio compares each set-up with off at the same concurrency.",
        "",
        "| concurrency | set-up | requests/s | p50 latency (s) | p95 latency (s) | vs off |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for level, baseline in enumerate(results["off"]):
        for setup, rows in results.items():
            row = rows[level]
            lines.append(
                f"| {row['concurrency']} | {setup} | {row['rps']:.1f} | {row['p50']:.3f} | {row['p95']:.3f} | "
                f"{row['rps'] / baseline['rps']:.1f}x |"
            )
    lines.append(f"<!-- {SECTION}:end -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id or model-store tag")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (about)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.machine = cpu_name()
    results = {setup: run_server(args.model, setup, args) for setup in SETUPS}
    section = render(results, args)
    publish(section, args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
