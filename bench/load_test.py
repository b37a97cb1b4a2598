"""Bounded load test: many concurrent clients, mixed APIs, for a fixed time, on loopback only.

Starts `bentoml serve` on the given model, then runs --clients closed-loop clients for
--seconds, each picking in turn: native inference, native streaming, OpenAI chat (streamed
or not), and batch inference. Every request must end with a result or an explicit 429/503:
a 5xx, a transport error or a stream without its final event counts as lost (counted at the
client, which sees every answer). The server's
resident memory is sampled throughout. The table goes to stdout and, with --output, into
docs/benchmarks.md; the exit status is 1 if anything was lost or failed.

    python bench/load_test.py --model .models/tiny --clients 64 --seconds 60 --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import subprocess
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

SECTION = "load-test"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (30, 160, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = _png()
DATA_URI = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


async def native(http: httpx.AsyncClient, tokens: int) -> int:
    data = {"request_data": json.dumps({"text_prompt": "describe", "max_tokens": tokens, "cache": False})}
    response = await http.post("/v1/vision/inference", files={"image_file": ("a.png", IMAGE)}, data=data)
    if response.status_code == 200 and response.json().get("status") != "success":
        return 599
    return response.status_code


async def native_stream(http: httpx.AsyncClient, tokens: int) -> int:
    data = {"request_data": json.dumps({"text_prompt": "describe", "max_tokens": tokens, "cache": False})}
    async with http.stream("POST", "/v1/vision/stream", files={"image_file": ("a.png", IMAGE)}, data=data) as response:
        if response.status_code != 200:
            return response.status_code
        last = None
        async for line in response.aiter_lines():
            if line:
                last = json.loads(line)
    return 200 if last and last["type"] == "done" and last["finish_reason"] in ("stop", "length") else 599


async def openai_chat(http: httpx.AsyncClient, tokens: int, stream: bool) -> int:
    body = {
        "model": "glm4v-tiny",
        "max_tokens": tokens,
        "stream": stream,
        "cache": False,  # every request generates, as on the other APIs
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": DATA_URI}}, {"type": "text", "text": "hi"}],
            }
        ],
    }
    if not stream:
        response = await http.post("/v1/chat/completions", json=body)
        return response.status_code
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return response.status_code
        done = False
        async for line in response.aiter_lines():
            done = done or line == "data: [DONE]"
    return 200 if done else 599


async def batch(http: httpx.AsyncClient, tokens: int) -> int:
    files = [("image_files", (f"{i}.png", IMAGE, "image/png")) for i in range(3)]
    data = {"batch_request": json.dumps({"requests": [{"text_prompt": "x", "max_tokens": tokens, "cache": False}] * 3})}
    response = await http.post("/v1/vision/batch-inference", files=files, data=data)
    if response.status_code == 200 and any(r["status"] != "success" for r in response.json()["results"]):
        return 599
    return response.status_code


KINDS = ["native", "stream", "openai", "openai-stream", "batch"]


async def client(url: str, index: int, deadline: float, tokens: int, tally: dict, kinds: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        turn = index
        while time.monotonic() < deadline:
            kind = kinds[turn % len(kinds)]
            turn += 1
            started = time.perf_counter()
            try:
                if kind == "native":
                    status = await native(http, tokens)
                elif kind == "stream":
                    status = await native_stream(http, tokens)
                elif kind == "openai":
                    status = await openai_chat(http, tokens, stream=False)
                elif kind == "openai-stream":
                    status = await openai_chat(http, tokens, stream=True)
                else:
                    status = await batch(http, tokens)
            except httpx.HTTPError as exc:
                status = f"transport:{type(exc).__name__}"
            tally[(kind, status)] += 1
            if status == 200:
                tally[("latency", kind)] += time.perf_counter() - started
            elif status in (429, 503):
                await asyncio.sleep(0.2)  # an honest client backs off


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(url: str, worker_pid: int, args: argparse.Namespace) -> tuple[dict, list[float]]:
    tally: dict = collections.defaultdict(float)
    memory: list[float] = []
    deadline = time.monotonic() + args.seconds

    async def sample_memory() -> None:
        while time.monotonic() < deadline:
            memory.append(_rss_mb(worker_pid))
            await asyncio.sleep(2)

    await asyncio.gather(
        sample_memory(), *(client(url, i, deadline, args.max_tokens, tally, args.apis) for i in range(args.clients))
    )
    return tally, memory


def _quartiles(samples: list[float]) -> list[str]:
    last = len(samples) - 1
    return [f"{samples[round(last * q)]:.0f}" for q in (0, 0.25, 0.5, 0.75, 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--apis", nargs="+", choices=KINDS, default=KINDS, help="which APIs the clients call")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    env = {"GLM4V_SERVED_MODEL_NAME": "glm4v-tiny", "GLM4V_MAX_CONCURRENCY": str(max(8, args.clients // 2))}
    server = Server(args.model, Path(tempfile.mkdtemp()) / "serve.log", **env)
    try:
        server.wait_ready()
        workers = subprocess.run(["pgrep", "-f", "_bentoml_impl.worker"], capture_output=True, text=True).stdout.split()
        worker_pid = int(workers[-1])
        print(f"# {args.clients} clients for {args.seconds:g} s ...", file=sys.stderr, flush=True)
        tally, memory = asyncio.run(run(server.url, worker_pid, args))
    finally:
        server.stop()

    ok = sum(v for (kind, status), v in tally.items() if kind != "latency" and status == 200)
    refused = sum(v for (kind, status), v in tally.items() if kind != "latency" and status in (429, 503))
    lost = {
        f"{kind} {status}": int(v)
        for (kind, status), v in tally.items()
        if kind != "latency" and status not in (200, 429, 503)
    }
    lines = [
        f"<!-- {SECTION}:start -->",
        f"## Load test: {args.clients} clients for {args.seconds:g} s, mixed APIs",
        "",
        f"`bench/load_test.py`, {date.today().isoformat()}, model `{args.model}` ({cpu_name()}), through `bentoml "
        f"serve` with GLM4V_MAX_CONCURRENCY={env['GLM4V_MAX_CONCURRENCY']}. Closed-loop clients cycle through native "
        "inference, native streaming, OpenAI chat (plain and streamed) and 3-item batch inference, all with the "
        f"result cache off, {args.max_tokens} new tokens each; a refused client waits 0.2 s before its next request.",
        "",
        "| API | answered | mean latency (s) | refused 429/503 |",
        "|---|---:|---:|---:|",
    ]
    for kind in args.apis:
        answered = int(tally[(kind, 200)])
        refused_kind = int(tally[(kind, 429)] + tally[(kind, 503)])
        mean = tally[("latency", kind)] / answered if answered else 0.0
        lines.append(f"| {kind} | {answered} | {mean:.3f} | {refused_kind} |")
    lines += [
        "",
        f"Answered {int(ok)}, refused with 429/503 {int(refused)}, lost (5xx, transport errors, streams without "
        f"their end) {sum(lost.values())} {lost or ''}. Server resident "
        f"memory (MB) at 0/25/50/75/100% of the run: {' / '.join(_quartiles(memory))}; at most {max(memory):.0f}.",
        f"<!-- {SECTION}:end -->",
    ]
    section = "\n".join(lines) + "\n"
    publish(section, args.output, SECTION)
    return 0 if not lost else 1


if __name__ == "__main__":
    sys.exit(main())
