"""Large images arriving while streams run: how long the running streams pause.

Four requests decode (ignore_eos) when a request with photos arrives (camera-sized by default:
4000x3000, 12 megapixels). Its prompt has to be built (the images resized, normalised and cut
into patches) before its prefill, and its prefill runs in chunks between decode steps. The
running rows get a token per scheduler step, so the longest gap between two steps after the
arrival is the longest pause their streams see. Also
shown: the new request's own time to first token (queue + prefill). Medians over --repeats.

    python bench/image_arrival_bench.py --model .models/tiny --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import date
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arrival import pause_while_arriving, ttft_ms
from report import machine_name, publish

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, load_model

SECTION = "image-arrival"


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Noise, so no resize can take a shortcut over flat colour."""
    return Image.effect_noise((width, height), 64 + seed).convert("RGB")


def measure(engine: Engine, images: list[Image.Image], streams: int) -> tuple[float, float]:
    """One arrival -> (longest pause of the running rows in ms, the new request's TTFT in ms)."""
    request = GenerationRequest("Describe the photos.", images=images, params=SamplingParams(max_new_tokens=1))
    pause, new = pause_while_arriving(engine, streams, lambda: engine.submit(request).result(timeout=300))
    if new.finish_reason == "error":
        raise RuntimeError(f"the request with images failed: {new.error}")
    return pause, ttft_ms(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id or model-store tag")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="4000x3000", help="each photo's WIDTHxHEIGHT")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4], help="photos per arriving request")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.split("x"))
    engine = Engine(load_model(args.model, device=args.device), default_max_new_tokens=32)
    rows = []
    try:
        for count in args.counts:
            images = [photo(width, height, seed) for seed in range(count)]
            measure(engine, images, args.streams)  # warm-up
            runs = [measure(engine, images, args.streams) for _ in range(args.repeats)]
            pause, ttft = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append((count, pause, ttft))
            print(f"# {count} photo(s): longest pause {pause:.1f} ms, its TTFT {ttft:.1f} ms", file=sys.stderr)
    finally:
        engine.close()

    lines = [
        f"<!-- {SECTION}:start -->",
        "## Large images arriving while streams run",
        "",
        f"`bench/image_arrival_bench.py`, {date.today().isoformat()}, model `{args.model}`, {machine_name()}. "
        f"{args.streams} rows decode when a request with {width}x{height} photos arrives; the longest pause is "
        "the longest gap between two of their tokens after it arrives, TTFT is that "
        f"request's own queue + prefill time. Median of {args.repeats} arrivals.",
        "",
        "| photos in the arriving request | longest pause of running streams (ms) | its TTFT (ms) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {count} | {pause:.1f} | {ttft:.1f} |" for count, pause, ttft in rows]
    lines.append(f"<!-- {SECTION}:end -->")
    publish("\n".join(lines) + "\n", args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
