"""Where a decode step's device time goes, kernel by kernel: what to optimise next.

The single-stream target is a fraction of the memory-bandwidth bound, so the question is
which kernels read at less than full bandwidth, and how much time goes to kernels too small
to matter for bandwidth at all. This profiles decode steps of the engine as served (compiled
on a GPU) without CUDA graphs, so each kernel shows on its own (a replayed graph runs the same
kernels, minus the launch gaps), and one prefill of an image prompt. Kernels are grouped into
matrix multiplies (library calls, and the reductions Inductor generates for one row: Triton
kernels named after the ``mm`` they replace), attention, other fused Triton kernels and the
rest; matrix multiplies are also given as read bandwidth (the text weights a step reads over
their time). Then the same step timed outside the profiler, on a GPU three ways: its kernels
alone, replayed from a CUDA graph back to back, and replayed with each step's greedy token read
back before the next, as the engine's loop does (a CPU gets the last two, without graphs).
The gaps between the three say where a single stream's time goes besides the kernels:
launch gaps inside the graph (what fewer kernels or programmatic dependent launch would cut)
and the wait for each token (what overlapping the host's work with the next step would hide).
On a GPU each listed kernel also shows its launch sizes (grid and block), its time per call, and
what coordinate-descent tuning measured for it alone. On an H200 they showed the variants
profiled in one process tuning their projections apart (Inductor reuses a tuned kernel only for
the very same source, metadata included), to different launches and speeds, and the tuner timing
one-row projections and norms at 2-35x their time in the step: the host's launch work, not the kernel
(docs/benchmarks.md, 2026-11-27; the --profiled-tuning experiment).

    python bench/decode_profile.py --architecture glm4.1v-9b --device cuda --output bench/results/benchmarks.md
    python bench/decode_profile.py --architecture tiny             # CPU operators instead of kernels
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from unittest import mock

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import build_model, copy_bandwidth, decode_weight_bytes, describe_decode
from report import machine_name, publish

from glm4v_bento.engine import GenerationRequest, SamplingParams, compiled_step, decode_attention
from glm4v_bento.engine.decode_graphs import Capture, cuda_capture
from glm4v_bento.engine.prompt import PromptBuilder
from glm4v_bento.engine.runner import ModelRunner

SECTION = "decode-profile"
GROUPS = [  # the first that matches: attention kernels' names can say "cutlass" too
    ("attention", re.compile(r"flash|fmha|attention|efficient", re.I)),
    # Library calls, or Inductor's own reductions for a one-row step (named after the mm they replace)
    ("matrix multiply", re.compile(r"gemm|gemv|cutlass|cublas|xmma|nvjet|aten::(mm|addmm|linear|matmul|bmm)", re.I)),
    ("matrix multiply", re.compile(r"triton_(red|per)_\w*_mm_")),
    ("fused (Triton)", re.compile(r"triton", re.I)),
]


def group_of(name: str) -> str:
    return next((group for group, pattern in GROUPS if pattern.search(name)), "other")


def kernel_times(prof, on_device: bool) -> dict[str, tuple[int, float]]:
    """name -> (calls, self time in µs): device kernels on a GPU, operators on a CPU."""
    times: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages():
        if on_device:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            spent = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            spent = event.self_cpu_time_total
        if spent > 0:
            times[event.key] = (event.count, spent)
    return times


def launch_sizes(trace: dict) -> dict[str, str]:
    """kernel name -> how it was launched ("grid 128, block 256": programs, threads each), from a
    Chrome trace of the profile. Two compilations of the same kernel source that ran at different
    speeds either were tuned to different launch sizes (these differ) or were not (they agree)."""
    sizes: dict[str, set[str]] = defaultdict(set)
    for event in trace.get("traceEvents", []):
        args = event.get("args", {})
        # "kernel", or "Kernel" in the traces of older Kineto versions
        if str(event.get("cat", "")).lower() == "kernel" and "grid" in args and "block" in args:
            grid, block = ("x".join(str(n) for n in args[key] if n != 1) or "1" for key in ("grid", "block"))
            sizes[event["name"]].add(f"grid {grid}, block {block}")
    return {name: "; ".join(sorted(found)) for name, found in sizes.items()}


class TunerTimings(logging.Handler):
    """What coordinate-descent tuning measured for each kernel it tuned, in µs per call: the launch
    sizes it kept, and the first it tried (Inductor times each alone, the L2 cache flushed before
    each run). Set beside the profile's own time per call, it says whether the tuning saw the
    kernel as the step runs it: on an H200 it measured 21-37 µs for projections that ran at
    9-13.5 µs a call. Read from the tuner's debug log, which names the kernel as the profiler does."""

    LOGGER = "torch._inductor.runtime.coordinate_descent_tuner"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.tuned: dict[str, tuple[float, float]] = {}  # name -> (kept, first tried)

    def emit(self, record: logging.LogRecord) -> None:
        # "%s: Improve from %s %f -> %s %f, %.3fx": name, first config, its ms, kept config, its ms
        if isinstance(record.msg, str) and record.msg.startswith("%s: Improve from") and len(record.args) >= 5:
            name, _, first_ms, _, kept_ms = record.args[:5]
            self.tuned[str(name)] = (float(kept_ms) * 1000, float(first_ms) * 1000)

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        log = logging.getLogger(self.LOGGER)
        level, propagate = log.level, log.propagate
        log.setLevel(logging.DEBUG)
        log.propagate = False  # the tuner's other debug lines stay out of the run's log
        log.addHandler(self)
        try:
            yield
        finally:
            log.removeHandler(self)
            log.setLevel(level)
            log.propagate = propagate


def profiled(device: torch.device, work, launches: dict[str, str] | None = None) -> dict[str, tuple[int, float]]:
    """The kernels' times; on a GPU, ``launches`` gets each kernel's launch sizes."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if launches is not None and device.type == "cuda":
        with tempfile.NamedTemporaryFile(suffix=".json") as trace:
            prof.export_chrome_trace(trace.name)
            launches.update(launch_sizes(json.loads(Path(trace.name).read_text())))
    return kernel_times(prof, device.type == "cuda")


def table(
    title: str,
    times: dict[str, tuple[int, float]],
    per: int,
    top: int,
    unit: str,
    launches: dict[str, str] | None = None,
    tuned: dict[str, tuple[float, float]] | None = None,
) -> list[str]:
    """Groups, then the ``top`` kernels (or operators: ``unit``), each per step (``per`` steps were
    profiled), with how each kernel was launched where ``launches`` says, and where ``tuned``
    says, its time per call beside what its tuning measured (TunerTimings)."""
    total = sum(spent for _, spent in times.values()) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for name, (_, spent) in times.items():
        groups[group_of(name)] += spent
    lines = [f"**{title}**: {total / per / 1000:.3f} ms of {unit} time per step.", ""]
    lines += ["| group | µs per step | share |", "|---|---:|---:|"]
    lines += [f"| {g} | {t / per:.1f} | {t / total:.0%} |" for g, t in sorted(groups.items(), key=lambda x: -x[1])]
    launched, timed_alone = bool(launches), bool(tuned)
    header = f"| {unit} | calls per step | µs per step | share |"
    header += " launch |" if launched else ""
    header += " µs per call | tuned alone: kept (first tried) |" if timed_alone else ""
    lines += ["", header, "|---|---:|---:|---:|" + ("---|" if launched else "") + ("---:|---:|" if timed_alone else "")]
    ranked = sorted(times.items(), key=lambda item: -item[1][1])[:top]
    for name, (calls, spent) in ranked:
        short = name if len(name) <= 90 else name[:87] + "..."
        row = f"| `{short.replace('|', '/')}` | {calls / per:.0f} | {spent / per:.1f} | {spent / total:.0%} |"
        row += f" {launches.get(name, '')} |" if launched else ""
        if timed_alone:
            alone = f"{tuned[name][0]:.1f} ({tuned[name][1]:.1f})" if name in tuned else ""
            row += f" {spent / calls:.1f} | {alone} |"
        lines.append(row)
    return [*lines, ""]


def step_timings(
    runner: ModelRunner, kernel_us: float, read: int, bandwidth: float, repeats: int, capture: Capture | None
) -> list[str]:
    """The last decode step again, ``repeats`` times each way, at the same rows and columns: a
    replay rewrites the same cache column, so each one is the same step (nothing grows).
    ``capture``: how graphs are recorded (None: no graphs, as on a CPU)."""
    device, rows, columns = runner.device, runner.rows, runner.cache.width
    on_gpu = device.type == "cuda"
    if capture is not None:
        runner.use_graphs(capture)
    step = runner.graphs.run if runner.graphs is not None else runner._step
    try:
        with torch.inference_mode():
            step(rows, columns)  # captures the graph (checked against an eager step)
            captured = runner.graphs is not None and runner.graphs.captured > 0

            def back_to_back() -> None:
                for _ in range(repeats):
                    step(rows, columns)
                if on_gpu:
                    torch.cuda.synchronize(device)

            def read_back() -> None:
                for _ in range(repeats):
                    step(rows, columns).argmax(dim=-1).tolist()

            timed = [_per_step_ms(work, repeats) for work in (back_to_back, read_back)]
    finally:
        runner.graphs = None  # what follows profiles kernels one by one again
    how = "replayed from a CUDA graph" if captured else "without CUDA graphs"
    how += "" if captured or capture is None else " (the capture failed: see log)"

    def line(label: str, ms: float) -> str:
        return f"| {label} | {ms:.3f} | {rows * 1000 / ms:.1f} | {read / (ms / 1000) / bandwidth:.2f} |"

    # A CPU's operator times are inflated by the profiler's own overhead: no figure to set beside these.
    kernels = [line("its kernels alone, back to back (the profile above)", kernel_us / 1000)] if on_gpu else []
    return [
        f"**Decode step of {rows} row(s) over {columns} columns, timed**: median of 3 runs of {repeats} steps each. "
        f"Of the bound: the {read / 1e9:.2f} GB of text weights over the step's time, against the measured copy "
        "bandwidth. The engine's own figure (gpu-bench) adds its bookkeeping between steps (loading the "
        "tokens, sampling parameters, detokenizing, stop checks).",
        "",
        "| the step | ms per step | tokens/s | of bound |",
        "|---|---:|---:|---:|",
        *kernels,
        line(f"{how}, steps back to back", timed[0]),
        line(f"{how}, each step's greedy token read back before the next", timed[1]),
        "",
    ]


def new_capture(device: torch.device) -> Capture | None:
    """How the step timings record graphs: CUDA's on a GPU, none on a CPU."""
    return cuda_capture() if device.type == "cuda" else None


def _per_step_ms(work, repeats: int) -> float:
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        work()
        runs.append((time.perf_counter() - started) / repeats * 1000)
    return statistics.median(runs)


@contextlib.contextmanager
def rotary_fused(runner: ModelRunner) -> Iterator[None]:
    """A step compiled anew with FUSED_ROTARY_OPTIONS added (a CPU's steps are not compiled: no
    change there), then the served step back."""
    served_step = runner.compiled
    try:
        with mock.patch.dict(compiled_step.COMPILE_OPTIONS, compiled_step.FUSED_ROTARY_OPTIONS):
            if served_step is not None:
                runner.compile_anew()  # takes the options as they are now
            yield
    finally:
        runner.compiled = served_step


@contextlib.contextmanager
def split_attention_off(runner: ModelRunner) -> Iterator[None]:
    """The compiled step attending with SDPA (it compiles again, as its guards see the switch
    change), then as served. A CPU's steps are not compiled: no change there."""
    step = runner.compiled
    if step is None:
        yield
        return
    with mock.patch.object(step, "split_attention", False):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=["tiny", "glm4.1v-9b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=1, help="running sequences in the profiled steps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--prompt-words",
        type=int,
        default=40,
        help="words in each row's prompt: the cache the profiled steps attend over (an image prompt is 1-6k tokens)",
    )
    parser.add_argument(
        "--flex",
        action="store_true",
        help="then profile the steps again with FlexAttention (the experiment in decode_attention.py)",
    )
    parser.add_argument(
        "--sdpa-attention",
        action="store_true",
        help="then profile and time the steps again attending with SDPA instead of the split-KV kernels "
        "(split_attention.py, as served for one row): a before/after in one process",
    )
    parser.add_argument(
        "--store-mlp-activation",
        action="store_true",
        help="then profile and time the steps again with each compiled layer storing its MLP activation "
        "(the experiment in compiled_step.py): a before/after in one process",
    )
    parser.add_argument(
        "--fuse-rotary",
        action="store_true",
        help="then profile and time the steps again compiled with compiled_step.FUSED_ROTARY_OPTIONS (the "
        "rotary embedding in one kernel with its concatenation and the key cache write): a before/after in one process",
    )
    parser.add_argument(
        "--profiled-tuning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every step here (served and experiments) tuned by each candidate kernel's profiled time, as served "
        "(profiled_tuning.py); the tuning column then shows what the profiler measured",
    )
    parser.add_argument("--timed-steps", type=int, default=50, help="steps in each run of the step timings")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--section", default=SECTION, help="name of the section in the output file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = build_model(tiny=args.architecture == "tiny", device=device, dtype=dtype)
    prompts = PromptBuilder(loaded.processor, max_images=1)
    side = 112 if args.architecture == "tiny" else 1024
    image = Image.new("RGB", (side, side), (120, 80, 200))
    params = SamplingParams(max_new_tokens=8)
    rows = [prompts.build(GenerationRequest("describe " * args.prompt_words, params=params)) for _ in range(args.rows)]
    picture = prompts.build(GenerationRequest("describe " * 50, images=[image], params=params))
    # As served, but without CUDA graphs: each kernel then shows on its own.
    runner = ModelRunner(loaded, max_rows=max(2, args.rows), cuda_graphs=False, profiled_tuning=args.profiled_tuning)

    def prefill() -> None:
        runner.prefill([picture])

    prefill()  # warm-up
    prefill_times = profiled(device, prefill)
    prefilled, _ = runner.prefill(rows)
    runner.join(prefilled)
    tokens = [1] * args.rows
    read = decode_weight_bytes(loaded.model)
    bandwidth = copy_bandwidth(device, 64 if device.type == "cpu" else 2048)
    unit = "kernel" if device.type == "cuda" else "operator"  # a CPU has no kernels to list

    tuner = TunerTimings()  # all variants': a kernel compiled again from the same source is not tuned again

    def decode_table(title: str, timings: bool = False) -> list[str]:
        def decode() -> None:
            for _ in range(args.steps):
                runner.decode(tokens)

        launches: dict[str, str] = {}
        with tuner.listening():
            for _ in range(3):  # compiles, where it is compiled; tunes each new kernel on a GPU
                runner.decode(tokens)
            times = profiled(device, decode, launches)
        matmul_us = sum(t for name, (_, t) in times.items() if group_of(name) == "matrix multiply") / args.steps
        step_us = sum(t for _, t in times.values()) / args.steps
        summary = (
            f"{describe_decode(runner)}. Matrix multiplies read the {read / 1e9:.2f} GB of text weights at "
            f"{read / (matmul_us / 1e6) / 1e9:.0f} GB/s; over the step's whole {unit} time, that is "
            f"{read / (step_us / 1e6) / 1e9:.0f} GB/s, {read / (step_us / 1e6) / bandwidth:.2f} of the measured "
            f"copy bandwidth ({bandwidth / 1e9:.0f} GB/s): what replayed steps would reach with their kernels back "
            "to back, before the gaps between kernels and the host's share of a step."
        )
        lines = [summary, "", *table(title, times, args.steps, args.top, unit, launches, tuner.tuned)]
        if not timings:
            return lines
        # A capture of its own each time: the graphs of the last timings are gone, and PyTorch
        # refuses to capture into a memory pool whose graphs were all freed.
        return lines + step_timings(runner, step_us, read, bandwidth, args.timed_steps, new_capture(device))

    decode_tables = decode_table("Decode step", timings=True)
    # Each experiment asked for, after the served step and undone before the next: (flag, what it
    # is, its table's title, the step timed too, the setting while it runs)
    experiments = [
        (args.store_mlp_activation, "With each compiled layer storing its MLP activation:",
         "Decode step, MLP activation stored", True, mock.patch.object(compiled_step, "STORE_MLP_ACTIVATION", True)),
        (args.fuse_rotary, "Compiled with the rotary embedding fused into fewer kernels (`FUSED_ROTARY_OPTIONS`):",
         "Decode step, rotary embedding fused", True, rotary_fused(runner)),
        (args.sdpa_attention, "With SDPA for the compiled steps' attention (the split-KV kernels off):",
         "Decode step, SDPA attention", True, split_attention_off(runner)),
        (args.flex, "With FlexAttention for the compiled steps' attention:",
         "Decode step, FlexAttention", False, decode_attention.switched_on(decode_attention.use_flex_decoding)),
    ]  # fmt: skip
    for asked, intro, title, timings, setting in experiments:
        if asked:
            with setting:
                decode_tables += [intro, "", *decode_table(title, timings=timings)]
    lines = [
        f"<!-- {args.section}:start -->",
        "## Where a decode step's time goes",
        "",
        f"`bench/decode_profile.py`, {date.today().isoformat()}, {machine_name()}, torch {torch.__version__}; "
        f"{loaded.model_id}, {str(dtype)[6:]}; {args.rows} running row(s) of {rows[0].num_tokens} "
        f"prompt tokens, no CUDA graphs (each kernel on its own); {args.steps} steps profiled. Decode steps:",
        "",
        *decode_tables,
        *table(f"Prefill of one {side}x{side} image + 50 words", prefill_times, 1, args.top, unit),
        f"<!-- {args.section}:end -->",
    ]
    publish("\n".join(lines) + "\n", args.output, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
