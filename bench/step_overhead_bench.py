"""The scheduler's own time per decode step: what the device waits for between two steps.

At each step the scheduler loads the tokens, samples, appends, detokenizes, checks stops and
hands text to waiting callers; on a GPU the device idles meanwhile, because the next step
needs the sampled tokens. This measures, at several batch sizes, the whole step and the
model's forward inside it (on the CPU both are synchronous), and their difference: the
host's share. Set against the time a GPU step must take at least (the weights it reads over
the memory bandwidth), it says whether overlapping the two would pay.

    python bench/step_overhead_bench.py --model .models/tiny --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.engine import Engine, GenerationRequest, SamplingParams, SchedulerLimits, load_model

SECTION = "step-overhead"


def measure(engine: Engine, rows: int, tokens: int) -> tuple[float, float]:
    """Median (whole step, model forward) seconds over the decode steps of ``rows`` requests."""
    runner, scheduler = engine.runner, engine.scheduler
    forwards: list[float] = []
    steps: list[float] = []
    forward, step = runner._forward, scheduler._step

    def timed_forward(*args):
        started = time.perf_counter()
        try:
            return forward(*args)
        finally:
            forwards.append(time.perf_counter() - started)

    def timed_step() -> None:
        started = time.perf_counter()
        step()
        steps.append(time.perf_counter() - started)

    runner._forward, scheduler._step = timed_forward, timed_step
    try:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0.0)
        engine.generate([GenerationRequest("describe " * 20, params=params) for _ in range(rows)])
    finally:
        runner._forward, scheduler._step = forward, step
    return statistics.median(steps), statistics.median(forwards[-len(steps) :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (e.g. .models/tiny)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--tokens", type=int, default=200, help="decode steps per measurement")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, device="cpu")
    engine = Engine(loaded, limits=SchedulerLimits(max_running=max(args.rows)))
    try:
        measure(engine, max(args.rows), 4)  # warm-up: buffers, first calls
        figures = [(rows, *measure(engine, rows, args.tokens)) for rows in args.rows]
    finally:
        engine.close()
    lines = [
        f"<!-- {SECTION}:start -->",
        "## Scheduler time per decode step (the host's share)",
        "",
        f"`bench/step_overhead_bench.py`, {date.today().isoformat()}, {cpu_name()}, model `{args.model}`, "
        f"median over {args.tokens} steps. Host = the step minus the model's forward: loading tokens, "
        "sampling, detokenizing, stop checks, handing text to callers.",
        "",
        "| rows | step ms | model forward ms | host ms | host per row µs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for rows, step, forward in figures:
        host = step - forward
        per_row = host / rows * 1e6
        lines.append(f"| {rows} | {step * 1e3:.2f} | {forward * 1e3:.2f} | {host * 1e3:.3f} | {per_row:.1f} |")
    lines.append(f"<!-- {SECTION}:end -->")
    publish("\n".join(lines) + "\n", args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
