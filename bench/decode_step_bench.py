"""Decode-step time against the KV cache's capacity: a step must cost what it attends over,
not what the buffers could hold.

The cache's buffers can be far larger than the columns a step attends over (they grow
ahead, and keep their size for the next batch). A write into a slice of a buffer is, once
compiled, a copy of the whole slice and back: the step then grows with the capacity. This
measures one step, eager and compiled, with the same rows and context in a small and a
large cache; the two times should match.

    python bench/decode_step_bench.py --model .models/tiny --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.engine import GenerationRequest, load_model
from glm4v_bento.engine.prompt import PromptBuilder
from glm4v_bento.engine.runner import ModelRunner

SECTION = "decode-step"


def step_seconds(runner: ModelRunner, prompt, rows: int, capacity: int, steps: int) -> float:
    """Median time of one decode step of ``rows`` rows, the cache grown to ``capacity`` columns."""
    with torch.inference_mode():
        prefilled, _ = runner.prefill([prompt] * rows)
        runner.join(prefilled)
        runner.cache.reserve(rows, capacity)
        tokens = [0] * rows
        for _ in range(3):  # warm-up (compiles on the first call)
            runner.decode(tokens)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            runner.decode(tokens)
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            times.append(time.perf_counter() - started)
        runner.keep([])
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local checkpoint (e.g. .models/tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--capacities", type=int, nargs="+", default=[512, 65536])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, device=args.device)
    prompt = PromptBuilder(loaded.processor, max_images=1).build(GenerationRequest("Describe a picture."))
    results = []
    for mode, compiled in (("eager", False), ("compiled", True)):
        runner = ModelRunner(loaded, max_rows=args.rows, cuda_graphs=False, compile_decode=compiled)
        for capacity in args.capacities:
            print(f"# {mode}, {capacity} columns ...", file=sys.stderr, flush=True)
            results.append((mode, capacity, step_seconds(runner, prompt, args.rows, capacity, args.steps)))

    machine = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else cpu_name()
    lines = [
        f"<!-- {SECTION}:start -->",
        "## Decode step against the cache's capacity",
        "",
        f"`bench/decode_step_bench.py`, {date.today().isoformat()}, {machine}, model `{loaded.model_id}`. "
        f"{args.rows} rows, a {prompt.num_tokens}-token context, no CUDA graphs; median of {args.steps} steps.",
        "",
        "| decode step | cache capacity (columns) | step (ms) | vs smallest capacity |",
        "|---|---:|---:|---:|",
    ]
    for mode, capacity, seconds in results:
        base = next(s for m, _, s in results if m == mode)
        lines.append(f"| {mode} | {capacity} | {seconds * 1000:.2f} | {seconds / base:.2f} |")
    lines.append(f"<!-- {SECTION}:end -->")
    publish("\n".join(lines) + "\n", args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
