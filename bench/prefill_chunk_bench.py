"""A long prompt arriving while streams run: how long they pause, by prefill chunk size.

Four requests decode (ignore_eos) when one long text prompt (--prompt-words words, about 5
tokens each) arrives. The running rows get a token per scheduler step, so the longest gap
between two steps while that prompt is admitted is the longest pause their streams see.
Chunk 0 prefills the prompt whole (the engine before chunking); the others prefill at most
that many tokens between two decode steps. Also shown: the long prompt's own time to first
token (queue + prefill). Medians over --repeats.

    python bench/prefill_chunk_bench.py --model .models/tiny --output docs/benchmarks.md
    python bench/prefill_chunk_bench.py --architecture glm4.1v-9b --device cuda   # random bf16 weights
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arrival import pause_while_arriving, ttft_ms
from report import machine_name, publish

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, load_model

SECTION = "prefill-chunks"


def _request(prompt: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt, params=SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0.0))


def measure(engine: Engine, args: argparse.Namespace) -> tuple[float, float, int]:
    """One arrival -> (longest pause of the running rows in ms, the long prompt's TTFT in ms, its tokens)."""
    prompt = _request("word " * args.prompt_words, 1)
    pause, long = pause_while_arriving(engine, args.streams, lambda: engine.submit(prompt).result(timeout=300))
    return pause, ttft_ms(long), long.usage.prompt_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="checkpoint directory, hub id or model-store tag")
    model.add_argument(
        "--architecture",
        choices=["glm4.1v-9b", "tiny"],
        help="no checkpoint: this architecture with random weights (bf16 on a GPU), as bench/gpu_bench.py builds it",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 2048, 512, 256])
    parser.add_argument("--prompt-words", type=int, default=1200, help="about 5 tokens each")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.architecture:
        import torch
        from gpu_bench import build_model

        device = torch.device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loaded = build_model(tiny=args.architecture == "tiny", device=device, dtype=dtype)
        args.model = loaded.model_id
    else:
        loaded = load_model(args.model, device=args.device)

    rows = []
    # One engine for all: a new one would compile its decode step again (on a GPU).
    engine = Engine(loaded, default_max_new_tokens=32)
    try:
        for chunk in args.chunks:
            engine.runner.prefill_chunk_tokens = chunk  # read at each prefill step; nothing runs now
            measure(engine, args)  # warm-up
            runs = [measure(engine, args) for _ in range(args.repeats)]
            pause, ttft = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append((chunk, pause, ttft, runs[0][2]))
            print(f"# chunk {chunk}: longest pause {pause:.1f} ms, long prompt TTFT {ttft:.1f} ms", file=sys.stderr)
    finally:
        engine.close()

    whole_pause = rows[0][1]
    lines = [
        f"<!-- {SECTION}:start -->",
        "## A long prompt arriving while streams run: prefill chunks",
        "",
        f"`bench/prefill_chunk_bench.py`, {date.today().isoformat()}, model `{args.model}`, {machine_name()}. "
        f"{args.streams} rows decode when a {rows[0][3]}-token text prompt arrives; the longest pause is the "
        "longest gap between two of their tokens while it is admitted, TTFT is that prompt's own queue + "
        f"prefill time. Chunk 0 = the whole prompt in one go. Median of {args.repeats} arrivals.",
        "",
        "| prefill chunk (tokens) | longest pause of running streams (ms) | long prompt TTFT (ms) | pause vs whole |",
        "|---:|---:|---:|---:|",
    ]
    for chunk, pause, ttft, _ in rows:
        lines.append(f"| {chunk} | {pause:.1f} | {ttft:.1f} | {pause / whole_pause:.2f} |")
    lines.append(f"<!-- {SECTION}:end -->")
    publish("\n".join(lines) + "\n", args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
