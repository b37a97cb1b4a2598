"""GPU benchmark: GLM-4.1V-9B's real architecture with random bf16 weights, built on the device.

No download: the model is built from the real configuration (40 text layers, hidden 4096,
32 heads, 2 KV heads, vocab 151552; 24 vision layers, hidden 1536) with random weights, which
behaves like the real model for speed. It runs through the project's own engine and measures:
- time to the first token of one 1024x1024 image + a 50-token prompt (its prefill);
- single-stream decode tokens/s, after a short prompt and after the image (a vision request's context);
- aggregate decode tokens/s at 8, 32 and 64 concurrent sequences (ignore_eos);
- peak GPU memory;
and gives each decode figure as a fraction of the memory-bandwidth bound: the bytes a step
must read (the text model's weights, once, + each row's KV cache) divided by the measured
device copy bandwidth.

    python bench/gpu_bench.py --output docs/benchmarks.md     # on a CUDA machine, bf16
    python bench/gpu_bench.py --tiny                          # a small model on the CPU (tests)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.engine import (
    Engine,
    GenerationRequest,
    LoadedModel,
    SamplingParams,
    SchedulerLimits,
    compiled_step,
    decode_attention,
)
from glm4v_bento.tiny import EOS_TOKENS, build_config, build_processor, build_tokenizer

# GLM-4.1V-9B-Thinking's published configuration (shared/design.md).
REAL_TEXT = {"hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32,
             "num_key_value_heads": 2, "vocab_size": 151552, "max_position_embeddings": 65536,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [8, 12, 12]}}  # fmt: skip
REAL_VISION = {"depth": 24, "hidden_size": 1536, "num_heads": 12, "intermediate_size": 13696, "out_hidden_size": 4096,
               "image_size": 336, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, layers: int | None = None) -> LoadedModel:
    """The architecture with random weights, made directly on ``device`` (tiny: the test sizes;
    ``layers``: that many text layers instead)."""
    from transformers import GenerationConfig, Glm4vForConditionalGeneration

    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    if not tiny:
        for key, value in REAL_TEXT.items():
            setattr(config.text_config, key, value)
        for key, value in REAL_VISION.items():
            setattr(config.vision_config, key, value)
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    processor = build_processor(tokenizer)
    if not tiny:  # the real pixel budget: a 1024x1024 image stays about 1024x1024
        processor.image_processor.size = {"shortest_edge": 12544, "longest_edge": 9633792}
    torch.manual_seed(0)
    with torch.device(device):
        model = Glm4vForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS])
    return LoadedModel(
        model=model,
        processor=processor,
        model_id="GLM-4.1V-9B architecture, random weights" if not tiny else "tiny architecture, random weights",
        revision=None,
        device=device,
        dtype=dtype,
        eos_token_ids=frozenset(model.generation_config.eos_token_id),
        max_context=int(config.text_config.max_position_embeddings),
        load_seconds=0.0,
    )


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: the text layers, final norm and output head.
    Not the vision tower (prefill only) nor the embedding table (one row per token)."""
    text = model.model.language_model
    parts = [text.layers, text.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def describe_decode(runner) -> str:
    """How the decode steps actually ran: a fallback after a failed check must show in the table."""
    path = runner.decode_path()
    how = "compiled (torch.compile)" if path["compiled"] else "eager"
    if runner.compiled is not None and not path["compiled"]:
        how = "eager: compilation failed or disagreed (see log)"
    layers, fused = len(runner.model.model.language_model.layers), path["fused_qkv_layers"]
    if fused == 0:
        how += ", queries, keys and values in three matrix multiplies"
    else:
        how += ", queries-keys-values in one matrix multiply"
        how += "" if fused == layers else f" in {fused} of {layers} layers"
    split = path["compiled"] and runner.device.type in decode_attention.SPLIT_DEVICES  # only compiled steps take them
    if split and runner.compiled.split_attention:
        how += ", attention by the split-KV kernels"
    tuning = runner.compiled.profiled_tuning if runner.compiled is not None else None
    if tuning is not None:  # what the profiler timed, and whether it gave up
        how += f", tuned by profiled kernel time ({tuning.timed} candidate launches"
        how += f"; {tuning.fell_back} timed by events where the profiler failed: see log)" if tuning.fell_back else ")"
    if runner.graphs is None:
        return f"{how}, no CUDA graphs"
    if path["cuda_graphs"]:
        return f"{how}, replayed from CUDA graphs ({path['cuda_graphs_captured']} captured)"
    return f"{how}, CUDA graphs turned off after a failed or mismatched capture (see log)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted): the fastest of 10
    timings of 5 copies each. The bound is what the card can reach, so a slow moment must not
    lower it (single timed copies on an H200 read anywhere from 3.86 to 4.18 TB/s)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _sync(device)
    copies, runs = 5, []
    for _ in range(10):
        started = time.perf_counter()
        for _ in range(copies):
            target.copy_(source)
        _sync(device)
        runs.append((time.perf_counter() - started) / copies)
    return 2 * source.numel() / min(runs)


def request(prompt_words: int, tokens: int, image: Image.Image | None) -> GenerationRequest:
    prompt = " ".join(["describe"] * prompt_words)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0.0)
    return GenerationRequest(prompt, images=[image] if image else [], params=params)


def decode_rate(engine: Engine, sequences: int, tokens: int, image: Image.Image | None = None) -> tuple[float, float]:
    """(aggregate decode tokens/s, mean context length) for ``sequences`` rows of a 40-word
    prompt (after ``image``, if given). Run twice, timed the second time: the first captures
    the CUDA graphs these shapes need."""
    engine.generate([request(40, tokens, image) for _ in range(sequences)])
    results = engine.generate([request(40, tokens, image) for _ in range(sequences)])
    decode_s = max(r.timings.decode_s for r in results)
    generated = sum(r.usage.completion_tokens - 1 for r in results)  # the first token comes from prefill
    context = statistics.mean(r.usage.prompt_tokens + r.usage.completion_tokens / 2 for r in results)
    return generated / decode_s, context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU (what the tests run)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        default=[8, 32, 64],
        help="sequences decoded together, each a row of the table; none: only the one-stream rows (and no "
        "compilation for batches)",
    )
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay decode steps from CUDA graphs (--no-cuda-graphs: the same engine, eager)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decode step (default: on CUDA only, as the server does)",
    )
    parser.add_argument(
        "--fused-qkv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one matrix multiply for queries, keys and values (--no-fused-qkv: three, as transformers)",
    )
    parser.add_argument(
        "--compile-option",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="override one of the engine's torch.compile options, e.g. coordinate_descent_tuning=false "
        "(a one-row step's matrix multiplies then stay GEMM library calls)",
    )
    parser.add_argument(
        "--store-mlp-activation",
        action="store_true",
        help="compiled layers store their MLP's activation once instead of recomputing it inside the "
        "down projection's one-row reduction (an experiment)",
    )
    parser.add_argument(
        "--fuse-rotary",
        action="store_true",
        help="compile with compiled_step.FUSED_ROTARY_OPTIONS: a one-row step's rotary embedding in fewer kernels "
        "(an experiment)",
    )
    parser.add_argument(
        "--profiled-tuning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="coordinate descent times each candidate launch by its kernel's device time (the profiler) "
        "instead of events around the launch (as served: glm4v_bento/engine/profiled_tuning.py)",
    )
    parser.add_argument(
        "--split-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a compiled step on a GPU attends with the split-KV kernels, the cache's columns spread over "
        "the multiprocessors (as served: glm4v_bento/engine/split_attention.py); --no-split-attention: SDPA",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--section", default="gpu-bench", help="name of the section in the output file")
    args = parser.parse_args(argv)
    # The engine's own progress (compile time, each graph captured, any fallback) goes to the log.
    logging.basicConfig(format="# %(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("glm4v_bento").setLevel(logging.INFO)

    for option in args.compile_option:  # read when the engine's step is compiled, below
        name, _, value = option.partition("=")
        try:
            compiled_step.COMPILE_OPTIONS[name] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--compile-option {option!r}: expected NAME=JSON, e.g. triton.enable_pdl=true")
    compiled_step.STORE_MLP_ACTIVATION = args.store_mlp_activation  # read when a layer is compiled
    if args.fuse_rotary:  # shown among the options in the report
        compiled_step.COMPILE_OPTIONS.update(compiled_step.FUSED_ROTARY_OPTIONS)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        print("error: the full benchmark needs a CUDA device (use --tiny on a CPU)", file=sys.stderr)
        return 2
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = 16 if args.tiny else args.decode_tokens
    image = Image.new("RGB", (112, 112) if args.tiny else (1024, 1024), (120, 80, 200))

    print(f"# building the model on {device} ...", file=sys.stderr, flush=True)
    loaded = build_model(args.tiny, device, dtype)
    limits = SchedulerLimits(max_running=max([1, *args.concurrency]), max_batch_tokens=10**9)
    engine = Engine(
        loaded,
        limits=limits,
        cuda_graphs=args.cuda_graphs,
        compile_decode=args.compile,
        fuse_qkv=args.fused_qkv,
        split_attention=args.split_attention,
        profiled_tuning=args.profiled_tuning,
    )
    served_overlap = engine.scheduler.overlap_steps
    try:
        engine.generate([request(50, 4, image)])  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # A one-token request's whole time: its sampled token waits for the GPU to finish the
        # prefill (the engine's own prefill timing may end while kernels still run).
        prefill = statistics.median(engine.generate([request(50, 1, image)])[0].timings.total_s for _ in range(3))
        rows = [("1", 1, *decode_rate(engine, 1, tokens))]
        # One stream with the other overlap setting (glm4v_bento/engine/overlap.py: on by default on
        # one GPU), on the same engine and its compiled kernels, in the same run.
        engine.scheduler.overlap_steps = not served_overlap
        other = "each step waited for" if served_overlap else "steps overlapped"
        rows.append(
            (f"1, {other} (GLM4V_OVERLAP_STEPS={str(not served_overlap).lower()})", 1, *decode_rate(engine, 1, tokens))
        )
        engine.scheduler.overlap_steps = served_overlap
        # What a user of a vision model decodes over: the image's tokens are most of the context.
        print("# 1 sequence after the image ...", file=sys.stderr, flush=True)
        rows.append((f"1, after the {image.width}x{image.height} image", 1, *decode_rate(engine, 1, tokens, image)))
        for sequences in args.concurrency:
            print(f"# {sequences} sequences ...", file=sys.stderr, flush=True)
            rows.append((str(sequences), sequences, *decode_rate(engine, sequences, tokens)))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    finally:
        engine.close()
    decode_mode = describe_decode(engine.runner)
    compiled = engine.runner.compiled
    compile_note = (
        f" (torch.compile: {compiled.compilations} compilation(s), {compiled.compile_seconds:.0f} s in all; "
        f"options {json.dumps(compiled_step.COMPILE_OPTIONS)}"
        f"{'; the MLP activation stored' if compiled_step.STORE_MLP_ACTIVATION else ''})"
        if compiled is not None and compiled.compilations
        else ""
    )

    bandwidth = copy_bandwidth(device, 64 if args.tiny else 2048)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    step_weights = decode_weight_bytes(loaded.model)
    text = loaded.model.config.text_config
    kv_per_token = (
        2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    )
    kv_per_token *= torch.finfo(dtype).bits // 8
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    lines = [
        f"<!-- {args.section}:start -->",
        f"## GPU benchmark{' (tiny, CPU: a smoke run, not a GPU figure)' if args.tiny else ''}",
        "",
        f"`bench/gpu_bench.py`, {date.today().isoformat()}, {machine}, {loaded.model_id}, {str(dtype)[6:]}; "
        f"weights {weights / 1e9:.2f} GB, of which a decode step reads {step_weights / 1e9:.2f} GB; "
        f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s. "
        f"Time to the first token of one {image.width}x{image.height} image + 50-token prompt: "
        f"{prefill * 1000:.1f} ms. "
        f"Peak GPU memory: {peak / 2**30:.1f} GiB. Static KV cache; decode steps {decode_mode}{compile_note}, "
        f"{'each overlapped with the host reading back the one before' if served_overlap else 'each waited for'}. "
        f"torch {torch.__version__}; {tokens} new tokens per sequence after a 40-word prompt (one row also after "
        "the image, as in the prefill above), timed on a second run.",
        "",
        "| sequences | decode tokens/s | per sequence | bytes read per step | bound (tokens/s) | of bound |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for label, sequences, rate, context in rows:
        step_bytes = step_weights + sequences * context * kv_per_token  # the text weights once, each row's KV
        bound = sequences * bandwidth / step_bytes
        lines.append(
            f"| {label} | {rate:.1f} | {rate / sequences:.1f} | {step_bytes / 1e9:.2f} GB | {bound:.0f} | "
            f"{rate / bound:.2f} |"
        )
    lines.append(f"<!-- {args.section}:end -->")
    section = "\n".join(lines) + "\n"
    publish(section, args.output, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
