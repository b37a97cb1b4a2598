"""The Triton kernels Inductor writes for one decoder layer of a single stream's decode step on a
CUDA GPU, written on any machine: no GPU, no download, about ten seconds.

A machine without a GPU cannot run or time these kernels, but what they compute is settled
before any GPU is touched: which kernel reads which buffer, where the MLP's SiLU is computed,
how many kernels a layer takes. This script traces one one-row decode layer of GLM-4.1V-9B's
text architecture (or the tiny one) on fake CUDA tensors, as torch.compile traces it
(Inductor's decompositions, the engine's compile options), then has Inductor lower it and write
its Triton source for a compute-capability-9.0 GPU, answering the few questions Inductor asks of
the device with an H200's figures. It does so for the layer as served and for the two
experiments in glm4v_bento/engine/compiled_step.py (the MLP activation stored, the rotary
embedding fused), and prints each kernel's size and what it loads and computes.

Attention is traced as the one cuDNN SDPA call the H200's profile shows: without a GPU, SDPA
would pick its math backend and come out as two batched multiplies and a softmax, with
different kernels around it. The SDPA call is a library kernel, not listed. The launch sizes are
a GPU's choice (coordinate-descent tuning times them there). It reaches into torch's internals (Inductor's
lowering, the device queries it answers), so a torch upgrade may need it adjusted:
the tests run it (tests/conftest.py's gpu_kernels), so that shows at once.

    python bench/inductor_kernels.py                 # the tables
    python bench/inductor_kernels.py --json          # the same, as JSON
    python bench/inductor_kernels.py --source DIR    # also each variant's generated module
    python bench/inductor_kernels.py --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import publish

from glm4v_bento.engine import compiled_step

COLUMNS = 64  # the cache columns the traced step attends over: any multiple of 16 gives the same kernels


def text_config(tiny: bool):
    """GLM-4.1V-9B's text configuration (gpu_bench's), or the tiny model's."""
    from gpu_bench import REAL_TEXT

    from glm4v_bento.tiny import build_config, build_tokenizer

    config = build_config(build_tokenizer()).text_config
    if not tiny:
        for key, value in REAL_TEXT.items():
            setattr(config, key, value)
    config._attn_implementation = "sdpa"
    return config


def sdpa_as_on_an_h200(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA through cuDNN's fused kernel, the backend an H200 chose for a decode step (the
    profile's ``cudnn_generated_fort_native_sdpa_sm90...``). Without a GPU, SDPA would pick math."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, attn_mask, False, scale=scale)[0]


def trace_one_row_layer(config, columns: int = COLUMNS) -> torch.fx.GraphModule:
    """A one-row decode layer (queries-keys-values fused) as torch.compile traces it for a CUDA
    device: fake tensors, Inductor's decompositions, the engine's compile options. Reads
    ``compiled_step.STORE_MLP_ACTIVATION`` as the engine does when it compiles."""
    from torch._inductor import config as inductor_config
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from transformers.models.glm4v import modeling_glm4v

    from glm4v_bento.engine.fused_qkv import fuse_qkv

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with (
            mock.patch.object(torch.compiler, "is_compiling", lambda: True),  # as while torch.compile traces
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa_as_on_an_h200),
            FakeTensorMode(),
            torch.device("cuda"),
            inductor_config.patch(compiled_step.COMPILE_OPTIONS),
        ):
            text = modeling_glm4v.Glm4vTextModel(config)
            fuse_qkv(text)
            hidden = torch.zeros(1, 1, config.hidden_size)
            cos, sin = text.rotary_emb(hidden, position_ids=torch.zeros(3, 1, 1, dtype=torch.long))
            keys = torch.zeros(2, kv_heads, columns + 16, head_dim)
            inputs = (hidden, hidden, cos, sin, torch.zeros(1, 1, 1, columns), keys, torch.zeros_like(keys))
            indices = (torch.arange(2), torch.zeros(1, dtype=torch.long))  # rows, write column (one for all rows)
            return make_fx(
                lambda *tensors: compiled_step.decode_layer(text.layers[0], text.norm, *tensors),
                decomposition_table=select_decomp_table(),
                tracing_mode="fake",
            )(*inputs, *indices)
    finally:
        torch.set_default_dtype(default_dtype)


@contextlib.contextmanager
def as_if_on_an_h200() -> Iterator[None]:
    """Answer what Inductor and Triton ask of the CUDA device while they lower and write kernels
    (its properties, Triton's target) with an H200's figures. Nothing is compiled or run."""
    from torch._inductor import scheduler
    from torch._inductor.runtime import hints
    from torch.utils import _triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    device = hints.DeviceProperties(
        type="cuda", index=0, multi_processor_count=132, cc=90, major=9, regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32,
    )  # fmt: skip
    properties = types.SimpleNamespace(
        name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, total_memory=141 * 2**30,
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, warp_size=32, L2_cache_size=50 * 2**20,
    )  # fmt: skip
    target = GPUTarget("cuda", 90, 32)
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(hints.DeviceProperties, "create", lambda *_: device))
        patches.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda *_: properties))
        patches.enter_context(mock.patch.object(torch.cuda, "get_device_capability", lambda *_: (9, 0)))
        patches.enter_context(mock.patch.object(scheduler, "has_triton", lambda: True))
        patches.enter_context(mock.patch.object(_triton, "triton_hash_with_backend", lambda: "offline-sm90"))
        patches.enter_context(mock.patch.object(_triton, "triton_backend", lambda: backends["nvidia"].compiler(target)))
        yield


def generate_source(graph: torch.fx.GraphModule) -> str:
    """The Python module Inductor writes for ``graph`` (its Triton kernels inside)."""
    from torch._guards import TracingContext, tracing
    from torch._inductor import config as inductor_config
    from torch._inductor.debug import DebugContext
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    inputs = [node.meta["val"] for node in graph.graph.nodes if node.op == "placeholder"]
    fake_mode = inputs[0].fake_mode
    with (
        warnings.catch_warnings(),
        as_if_on_an_h200(),
        DebugContext(),
        inductor_config.patch({**compiled_step.COMPILE_OPTIONS, "compile_threads": 1}),
        V.set_fake_mode(fake_mode),
        tracing(TracingContext(fake_mode)),
    ):
        # Inductor checks whether fake constants share memory with the inputs: there is none here.
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        lowering = GraphLowering(graph, example_inputs=inputs)
        with V.set_graph_handler(lowering):
            lowering.run(*inputs)
            module, _ = lowering.codegen()
    return module.value


@dataclass(frozen=True)
class Kernel:
    name: str
    kind: str  # reduction, persistent reduction, pointwise
    outputs: int  # xnumel: the values it computes
    reduced: int  # r0_numel: the values it sums for each (0: pointwise)
    loads: int
    stores: int
    exps: int  # exponentials in its source: a SiLU, a softmax
    role: str  # which multiply by a weight it is, where its sizes say so

    @property
    def label(self) -> str:
        return self.role or self.kind


KERNEL = re.compile(r"^(\w+) = async_compile\.triton\('\w+', '''(.*?)''', device_str='cuda'\)", re.S | re.M)
KINDS = {"red": "reduction", "per": "persistent reduction", "poi": "pointwise"}


def parse_kernels(source: str, config) -> list[Kernel]:
    """The Triton kernels in a generated module, in the order it defines them."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    keys = config.num_key_value_heads * (hidden // config.num_attention_heads)  # one row's keys (or values)
    qkv = hidden + 2 * keys
    roles = {
        (qkv, hidden): "queries, keys, values",
        (hidden, hidden): "output projection",
        (2 * intermediate, hidden): "gate and up",
        (intermediate, hidden): "gate and up",
        (hidden, intermediate): "down projection",
        (1, hidden): "norms, residual add",
    }
    pointwise_roles = {  # by the values they write and how many stores: the queries are as wide as the hidden state
        (hidden, 1): "queries, rotary embedding",
        (hidden // 2, 1): "queries, half of each head",
        (keys, 1): "keys, rotary embedding",
        (keys // 2, 1): "keys, half of each head",
        (keys, 2): "keys and values into the cache",
    }
    kernels = []
    for name, body in KERNEL.findall(source):
        sizes = {key: int(value) for key, value in re.findall(r"^\s+(xnumel|r0_numel) = (\d+)$", body, re.M)}
        outputs, reduced = sizes.get("xnumel", 1), sizes.get("r0_numel", 0)
        stores = body.count("tl.store(")
        kernels.append(
            Kernel(
                name=name,
                kind=KINDS[name.split("_")[1]],
                outputs=outputs,
                reduced=reduced,
                loads=body.count("tl.load("),
                stores=stores,
                exps=len(re.findall(r"\bexp\(", body)),
                role=roles.get((outputs, reduced), "") if reduced else pointwise_roles.get((outputs, stores), ""),
            )
        )
    return kernels


@dataclass(frozen=True)
class Variant:
    file: str  # its generated module's name, with --source
    store_mlp_activation: bool = False
    options: dict = field(default_factory=dict)  # Inductor options added to the engine's


VARIANTS = {
    "as served": Variant("layer_served.py"),
    "MLP activation stored (experiment)": Variant("layer_stored.py", store_mlp_activation=True),
    "rotary embedding fused (experiment)": Variant("layer_rotary_fused.py", options=compiled_step.FUSED_ROTARY_OPTIONS),
}


def layer_kernels(tiny: bool, source_dir: Path | None = None) -> dict[str, list[Kernel]]:
    """Each variant's kernels for one one-row decode layer."""
    config = text_config(tiny)
    found = {}
    for label, variant in VARIANTS.items():
        with (
            mock.patch.object(compiled_step, "STORE_MLP_ACTIVATION", variant.store_mlp_activation),
            mock.patch.dict(compiled_step.COMPILE_OPTIONS, variant.options),
        ):
            source = generate_source(trace_one_row_layer(config))
        if source_dir is not None:
            (source_dir / variant.file).write_text(source)
        found[label] = parse_kernels(source, config)
    return found


def table(kernels: list[Kernel]) -> str:
    lines = [
        "| kernel | what | values out | summed for each | loads | stores | exp |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kernel in kernels:
        lines.append(
            f"| `{kernel.name}` | {kernel.label} | {kernel.outputs} | {kernel.reduced or ''} "
            f"| {kernel.loads} | {kernel.stores} | {kernel.exps} |"
        )
    return "\n".join(lines)


SECTION = "inductor-kernels"


def report(found: dict[str, list[Kernel]], tiny: bool, section: str) -> str:
    import triton

    sizes = "the tiny model's sizes" if tiny else "GLM-4.1V-9B's sizes"
    lines = [
        f"<!-- {section}:start -->",
        "## The kernels Inductor writes for one decoder layer of a single stream",
        "",
        f"`bench/inductor_kernels.py`, {date.today().isoformat()}, torch {torch.__version__}, Triton "
        f"{triton.__version__}; {sizes}; written for a compute-capability-9.0 GPU (an H200's figures) "
        "on a machine without one, not run. Attention is one cuDNN SDPA call, as on the H200 (a library "
        "kernel, not listed). Values out: the kernel's outputs; summed for each: its reduction's length.",
    ]
    for variant, kernels in found.items():
        lines += ["", f"**{variant}**: {len(kernels)} Triton kernels", "", table(kernels)]
    lines += [f"<!-- {section}:end -->", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model's sizes instead of GLM-4.1V-9B's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--source", type=Path, help="also write each variant's generated module into this folder")
    parser.add_argument("--output", type=Path, help="write the tables into this Markdown file (docs/benchmarks.md)")
    parser.add_argument("--section", default=SECTION, help="name of the section in the output file")
    args = parser.parse_args(argv)
    if args.source:
        args.source.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # Inductor writes each kernel's file there
        found = layer_kernels(args.tiny, args.source)
    if args.json:
        print(json.dumps({variant: [asdict(k) for k in kernels] for variant, kernels in found.items()}, indent=1))
    else:
        publish(report(found, args.tiny, args.section), args.output, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
