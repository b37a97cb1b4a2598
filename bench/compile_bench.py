"""How long torch.compile holds up decoding: the compiled decode step's first call, a batch that
grows, and a long prompt joining, on a model of the real depth.

The decode step is compiled on its first call (the server's warm-up) and again whenever
torch.compile meets a shape or guard it has not seen; each compilation stalls every running
stream. The cost grows with the number of layers compiled, not their width, so on a CPU a
model of GLM-4.1V-9B's 40 layers at the tiny width shows it; on a GPU, --architecture
glm4.1v-9b builds the real one (random bf16 weights). Each event is the wall time of the one
decode step it happens in (torch.compile's checks against the eager step included).

    python bench/compile_bench.py --output docs/benchmarks.md          # CPU, 40 tiny layers
    python bench/compile_bench.py --architecture glm4.1v-9b --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.compiler.config as compiler_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import build_model
from report import machine_name, publish

from glm4v_bento.engine import GenerationRequest, SamplingParams
from glm4v_bento.engine.prompt import PromptBuilder
from glm4v_bento.engine.runner import ModelRunner

SECTION = "compile-time"


def timed_step(runner: ModelRunner, tokens: list[int]) -> float:
    started = time.perf_counter()
    logits = runner.decode(tokens)
    logits.float().sum().item()  # wait for the device
    return time.perf_counter() - started


def measure(loaded, short: list, long) -> tuple[list[tuple[str, float]], bool]:
    """(event, seconds of its decode step) for each event, and whether it still ran compiled."""
    # No CUDA graphs: each event is the compilation alone, not a graph capture besides.
    runner = ModelRunner(loaded, max_rows=8, compile_decode=True, cuda_graphs=False)
    rows: list[tuple[str, float]] = []

    def join(prompts) -> None:
        prefilled, _ = runner.prefill(prompts)
        runner.join(prefilled)

    join(short[:1])
    rows.append(("first step: 1 row (compiles for one row)", timed_step(runner, [1])))
    rows.append(("next step, 1 row", timed_step(runner, [1])))
    join(short[1:])
    rows.append(("the batch grows to 4 rows (compiles for batches)", timed_step(runner, [1] * 4)))
    join([long])
    rows.append((f"a long prompt joins ({runner.cache.width + 1} columns)", timed_step(runner, [1] * 5)))
    rows.append(("next step, 5 rows", timed_step(runner, [1] * 5)))
    return rows, bool(runner.decode_path()["compiled"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=["tiny", "glm4.1v-9b"], default="tiny")
    parser.add_argument("--layers", type=int, default=40, help="text layers (GLM-4.1V-9B has 40)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--long-prompt-words", type=int, default=700, help="about 5 tokens each")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = build_model(tiny=args.architecture == "tiny", device=device, dtype=dtype, layers=args.layers)
    prompts = PromptBuilder(loaded.processor, max_images=1)

    def prompt(text: str):
        return prompts.build(GenerationRequest(text, params=SamplingParams(max_new_tokens=8)))

    short = [prompt(f"question {i}: what is in the picture?") for i in range(4)]
    long = prompt("describe " * args.long_prompt_words)
    # Cold starts, as in a fresh container: no compiled code kept from an earlier run.
    with compiler_config.patch(force_disable_caches=True):
        rows, compiled = measure(loaded, short, long)

    lines = [
        f"<!-- {SECTION}:start -->",
        "## torch.compile: how long each event holds decoding up",
        "",
        f"`bench/compile_bench.py`, {date.today().isoformat()}, {machine_name()}, torch {torch.__version__}; "
        f"{args.architecture} width, {args.layers} text layers, {str(dtype)[6:]}, random weights; no CUDA graphs. "
        f"Each row is the wall time of one decode step. Still compiled at the end: {'yes' if compiled else 'NO'}.",
        "",
        "| event | step (ms) |",
        "|---|---:|",
        *(f"| {event} | {seconds * 1000:.1f} |" for event, seconds in rows),
        f"<!-- {SECTION}:end -->",
    ]
    publish("\n".join(lines) + "\n", args.output, SECTION)
    return 0 if compiled else 1


if __name__ == "__main__":
    sys.exit(main())
