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

--restart measures the same events in two processes, one after the other, sharing one new
compile cache (TORCHINDUCTOR_CACHE_DIR): a first start, then a restart that finds what the first
one compiled and tuned, as a server restarted on the same host finds it in /tmp, or a container
with that folder on a volume.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.compiler.config as compiler_config
from torch._dynamo.utils import counters

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


def in_own_process(argv: list[str], cache: str) -> tuple[list[tuple[str, float]], bool, int]:
    """The events measured by a new process of this script whose compile cache is ``cache``,
    whether it still ran compiled, and how many compiled graphs it found in the cache."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    env.pop("TRITON_CACHE_DIR", None)  # Triton's compiled kernels then go under the same folder
    done = subprocess.run(
        [sys.executable, __file__, *argv, "--child"], env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"compile_bench failed in its own process (exit status {done.returncode}; errors above)")
    found = json.loads(done.stdout.splitlines()[-1])
    return [(event, seconds) for event, seconds in found["rows"]], found["compiled"], found["cache_hits"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=["tiny", "glm4.1v-9b"], default="tiny")
    parser.add_argument("--layers", type=int, default=40, help="text layers (GLM-4.1V-9B has 40)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--long-prompt-words", type=int, default=700, help="about 5 tokens each")
    parser.add_argument(
        "--restart", action="store_true", help="a first start, then a restart that keeps its compile cache"
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one side of --restart
    args = parser.parse_args(argv)
    if args.restart:
        return restart(args)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = build_model(tiny=args.architecture == "tiny", device=device, dtype=dtype, layers=args.layers)
    prompts = PromptBuilder(loaded.processor, max_images=1)

    def prompt(text: str):
        return prompts.build(GenerationRequest(text, params=SamplingParams(max_new_tokens=8)))

    short = [prompt(f"question {i}: what is in the picture?") for i in range(4)]
    long = prompt("describe " * args.long_prompt_words)
    if args.child:  # with the compile cache the parent chose, kept for the next process
        rows, compiled = measure(loaded, short, long)
        hits = counters["inductor"]["fxgraph_cache_hit"]  # compiled graphs found in the cache, not compiled
        print(json.dumps({"rows": rows, "compiled": compiled, "cache_hits": hits}))
        return 0
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


def restart(args: argparse.Namespace) -> int:
    """A first start and a restart, each in a process of its own, sharing one new compile cache."""
    argv = ["--architecture", args.architecture, "--layers", str(args.layers), "--device", args.device]
    argv += ["--long-prompt-words", str(args.long_prompt_words)]
    with tempfile.TemporaryDirectory(prefix="glm4v-compile-cache-") as cache:
        print("# first start, with an empty compile cache ...", file=sys.stderr, flush=True)
        first, first_compiled, first_hits = in_own_process(argv, cache)
        print("# restart, keeping that cache ...", file=sys.stderr, flush=True)
        again, again_compiled, again_hits = in_own_process(argv, cache)
    section = "compile-restart"
    still = "yes" if first_compiled and again_compiled else "NO"
    lines = [
        f"<!-- {section}:start -->",
        "## torch.compile after a restart that keeps the compile cache",
        "",
        f"`bench/compile_bench.py --restart`, {date.today().isoformat()}, {machine_name()}, torch {torch.__version__}; "
        f"{args.architecture} width, {args.layers} text layers, random weights; no CUDA graphs. Two processes one "
        "after the other, sharing one compile cache (TORCHINDUCTOR_CACHE_DIR), empty for the first. Each row is the "
        f"wall time of one decode step. Still compiled at the end of both: {still}. Compiled graphs found in the "
        f"cache: {first_hits} at the first start, {again_hits} at the restart.",
        "",
        "| event | first start (ms) | restart, cache kept (ms) |",
        "|---|---:|---:|",
        *(
            f"| {event} | {cold * 1000:.1f} | {warm * 1000:.1f} |"
            for (event, cold), (_, warm) in zip(first, again, strict=True)
        ),
        f"<!-- {section}:end -->",
    ]
    publish("\n".join(lines) + "\n", args.output, section)
    return 0 if still == "yes" else 1


if __name__ == "__main__":
    sys.exit(main())
