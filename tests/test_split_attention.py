"""The split-KV attention kernels: their checks (tests/split_attention_checks.py) in a process of
their own with Triton's interpreter (Triton decides when it is imported whether it interprets,
and this test process has imported it already, for real kernels), their build for an H200, and
which compiled steps take them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).with_name("split_attention_checks.py")


def test_split_attention_checks_pass_under_tritons_interpreter():
    # Two processes at once, the long compiled-step check in one and the rest in the other: the
    # interpreter runs on one core each (a "k" and "not k" split leaves no check out).
    halves = ("compiled_step", "not compiled_step")
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", half, str(CHECKS)],
            env={**os.environ, "TRITON_INTERPRET": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for half in halves
    ]
    passed = 0
    for run in runs:
        stdout, stderr = run.communicate(timeout=540)
        summary = stdout.strip().splitlines()[-1] if stdout.strip() else stderr[-2000:]
        assert run.returncode == 0, stdout[-6000:] + stderr[-2000:]
        assert "skipped" not in summary, summary
        found = re.search(r"(\d+) passed", summary)
        passed += int(found.group(1)) if found else 0
    assert passed == 13  # every check ran


def compile_for(capability: int, kernel, signature: dict[str, str], constants: dict) -> object:
    """Triton's compiler to a binary for a GPU of this compute capability (90: H100/H200), no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature = signature | dict.fromkeys(constants, "constexpr")
    names = list(signature)
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    target = GPUTarget("cuda", capability, 32)
    return compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)


GLM_HEADS = dict(KV_HEADS=2, GROUP=16, HEAD_DIM=128, DIM_BLOCK=128)


@pytest.mark.parametrize(
    ("capability", "values", "shape", "precision", "shared_kib"),
    [
        (90, "bf16", GLM_HEADS, "tf32", 227),  # GLM-4.1V-9B on an H100/H200
        (90, "fp32", dict(KV_HEADS=2, GROUP=2, HEAD_DIM=16, DIM_BLOCK=16), "ieee", 227),  # the tiny model
        (80, "bf16", GLM_HEADS, "tf32", 163),  # an A100
        (75, "fp16", GLM_HEADS, "tf32", 64),  # a T4: no bfloat16, so the model decodes in float16
    ],
    ids=["h200-glm4.1v-9b-bfloat16", "h200-tiny-float32", "a100-bfloat16", "t4-float16"],
)
def test_split_attention_kernels_compile_for_the_gpus_a_single_stream_may_run_on(
    capability, values, shape, precision, shared_kib
):
    """The interpreter runs the kernels' Python, not Triton's compiler: what only a GPU build
    checks (a matrix multiply's shapes and types, shared memory) is checked here, to a binary.
    A compiled step whose kernels fail to build decodes eagerly from then on, so each GPU a
    single stream may be served on must build them."""
    from glm4v_bento.engine import split_attention

    partials, combine = split_attention._kernels(False)
    splits = dict(SPLIT_COUNT=split_attention.SPLITS)
    pointers = dict.fromkeys(["query", "key", "value", "mask"], f"*{values}")
    partial = dict.fromkeys(["partial_out", "partial_max", "partial_sum"], "*fp32")
    strides = dict.fromkeys(
        ["q_row", "q_head", "k_row", "k_head", "k_column", "v_row", "v_head", "v_column", "m_row"], "i32"
    )
    first = compile_for(
        capability,
        partials,
        pointers | partial | {"columns": "i32", "chunk": "i32", "scale": "fp32"} | strides,
        shape
        | splits
        | dict(GROUP_BLOCK=16, BLOCK_N=split_attention.BLOCK_COLUMNS, HAS_MASK=True, PRECISION=precision),
    )
    second = compile_for(capability, combine, partial | {"output": f"*{values}", "used": "i32"}, shape | splits)
    for kernel in (first, second):
        assert kernel.asm["cubin"] and kernel.metadata.shared <= shared_kib * 1024  # the GPU's most per block


@pytest.fixture
def compiling(monkeypatch):
    """Inside a trace, as torch.compile runs decode_attention (nothing compiles here)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_a_compiled_step_takes_the_split_kernels_on_a_gpu_while_asked_to(compiling):
    from glm4v_bento.engine import decode_attention

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    with decode_attention.split_attention_on(True):
        assert decode_attention._splits(gpu)
        assert not decode_attention._splits(cpu)
        with decode_attention.split_attention_on(False):  # GLM4V_SPLIT_ATTENTION=false
            assert not decode_attention._splits(gpu)
        assert decode_attention._splits(gpu)  # the setting before is back
    assert not decode_attention._splits(gpu)  # outside a compiled step's call: nothing asked


def test_the_eager_step_never_takes_the_split_kernels():
    from glm4v_bento.engine import decode_attention

    with decode_attention.split_attention_on(True):
        assert not decode_attention._splits(torch.device("cuda", 0))  # not compiling


@pytest.mark.parametrize("split", [True, False])
def test_a_compiled_step_asks_for_the_split_kernels_while_its_call_runs(split):
    """GLM4V_SPLIT_ATTENTION reaches the trace through the compiled step's own setting."""
    from glm4v_bento.engine import decode_attention
    from glm4v_bento.engine.compiled_step import CompiledStep, DecodeParts

    seen = []

    def forward(rows, columns, parts):  # the compiled call; torch.compile would trace inside it
        seen.append(decode_attention._splitting)
        return torch.zeros(rows, 4)

    step = CompiledStep(forward, DecodeParts(begin=forward, layer=forward, end=forward), split_attention=split)
    step.compiled(1, 16)
    step.eager(1, 16)
    assert seen == [split, False]
    assert decode_attention._splitting is False
