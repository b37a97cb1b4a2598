"""Short requests behind long ones: continuous batching vs the static batcher.

Four long requests (--long-tokens, ignore_eos) start together; meanwhile short requests
(--short-tokens) arrive one every --interval-ms. We measure each short request's latency
(submit -> result) under both scheduling policies of the same engine code (static: a batch
runs until its longest row ends; continuous: rows join and leave at every step).

    python bench/scheduler_bench.py --model .models/tiny --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, SchedulerLimits, load_model

SECTION = "scheduler-latency"


def _request(prompt: str, tokens: int) -> GenerationRequest:
    image = Image.new("RGB", (56, 56), (120, 60, 200))
    return GenerationRequest(
        prompt, images=[image], params=SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0.0)
    )


def run(engine: Engine, args: argparse.Namespace) -> dict:
    engine.generate([_request("warm-up", 4)])
    started = time.perf_counter()
    longs = [engine.submit(_request(f"long {i}", args.long_tokens)) for i in range(args.long_requests)]
    shorts = []

    def feed() -> None:
        for i in range(args.short_requests):
            shorts.append(engine.submit(_request(f"short {i}", args.short_tokens)))
            time.sleep(args.interval_ms / 1000)

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join()
    latencies = [handle.result().timings.total_s for handle in shorts]  # submit -> result
    long_done = max(h.result().timings.total_s for h in longs)
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "long": long_done,
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--long-requests", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--short-requests", type=int, default=40)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, device=args.device)
    rows = {}
    for policy in ("static", "continuous"):
        print(f"# {policy} ...", file=sys.stderr, flush=True)
        engine = Engine(loaded, limits=SchedulerLimits(policy=policy))
        try:
            rows[policy] = run(engine, args)
        finally:
            engine.close()

    ratio = rows["continuous"]["p50"] / rows["static"]["p50"]
    lines = [
        f"<!-- {SECTION}:start -->",
        "## Short requests behind long ones: continuous vs static batching",
        "",
        f"`bench/scheduler_bench.py`, {date.today().isoformat()}, model `{args.model}` ({cpu_name()}). "
        f"{args.long_requests} long requests ({args.long_tokens} tokens, ignore_eos) start together; "
        f"{args.short_requests} short ones ({args.short_tokens} tokens) arrive one every {args.interval_ms:g} ms. "
        "Latency = submit to result, engine only (no HTTP).",
        "",
        "| scheduler | short p50 (s) | short p95 (s) | longs done after (s) | all done after (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for policy, row in rows.items():
        lines.append(f"| {policy} | {row['p50']:.3f} | {row['p95']:.3f} | {row['long']:.2f} | {row['wall']:.2f} |")
    lines += ["", f"Continuous p50 / static p50 = {ratio:.3f} (target: at most 0.2).", f"<!-- {SECTION}:end -->"]
    section = "\n".join(lines) + "\n"
    publish(section, args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
