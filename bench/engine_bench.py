"""Engine throughput: generated tokens per second at several batch sizes.

Runs the engine alone (no BentoML, no HTTP). Every request carries one image and decodes
greedily for exactly --max-new-tokens tokens (ignore_eos), so each batch does a fixed
amount of work. The table goes to stdout and, with --output, into a marked section of a
Markdown file (other sections of that file are kept).

    python bench/engine_bench.py --model .models/tiny --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, load_model

SECTION = "engine-throughput"


def make_requests(batch_size: int, max_new_tokens: int) -> list[GenerationRequest]:
    # Greedy whatever the checkpoint recommends: the same work on every revision compared.
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, temperature=0.0)
    return [
        GenerationRequest(
            prompt=f"Describe image number {i} in detail.",
            images=[Image.new("RGB", (64 + 8 * (i % 4), 48), (40 * i % 256, 90, 160))],
            params=params,
        )
        for i in range(batch_size)
    ]


def measure(engine: Engine, batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    engine.generate(make_requests(batch_size, 4))  # warm-up: allocator, kernels, lazy imports
    rates, latencies = [], []
    for _ in range(repeats):
        requests = make_requests(batch_size, max_new_tokens)
        started = time.perf_counter()
        results = engine.generate(requests)
        elapsed = time.perf_counter() - started
        generated = sum(r.usage.completion_tokens for r in results)
        if generated != batch_size * max_new_tokens:
            raise RuntimeError(f"expected {batch_size * max_new_tokens} tokens, got {generated}")
        rates.append(generated / elapsed)
        latencies.append(elapsed)
    return {
        "batch": batch_size,
        "tokens_per_s": statistics.median(rates),
        "latency_s": statistics.median(latencies),
    }


def machine_description(loaded) -> str:
    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else cpu_name()
    return (
        f"{device}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
        f"Python {platform.python_version()}; model `{loaded.model_id}` ({loaded.dtype})"
    )


def render(rows: list[dict], args: argparse.Namespace, machine: str) -> str:
    base = rows[0]["tokens_per_s"]
    lines = [
        f"<!-- {SECTION}:start -->",
        "## Engine throughput: requests submitted together",
        "",
        f"`bench/engine_bench.py`, {date.today().isoformat()}. {machine}.",
        f"Each request: one image + short prompt, greedy, exactly {args.max_new_tokens} new tokens "
        f"(ignore_eos). Median of {args.repeats} runs.",
        "",
        "| batch | tokens/s | batch latency (s) | vs batch 1 |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['batch']} | {row['tokens_per_s']:.1f} | {row['latency_s']:.2f} | "
            f"{row['tokens_per_s'] / base:.1f}x |"
        )
    lines.append(f"<!-- {SECTION}:end -->")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local checkpoint (e.g. .models/tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, help="Markdown file to write the table into")
    args = parser.parse_args(argv)

    loaded = load_model(args.model, device=args.device)
    engine = Engine(loaded)
    machine = machine_description(loaded)
    print(f"# {machine}", file=sys.stderr)
    rows = []
    try:
        for batch_size in args.batch_sizes:
            print(f"# batch {batch_size} ...", file=sys.stderr, flush=True)
            rows.append(measure(engine, batch_size, args.max_new_tokens, args.repeats))
    finally:
        engine.close()
    section = render(rows, args, machine)
    publish(section, args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
