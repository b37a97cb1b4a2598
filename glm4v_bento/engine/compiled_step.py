"""The decode step compiled with torch.compile, one decoder layer at a time.

A decode step of a 9B model is dominated by reading the weights, but eager PyTorch adds
about fifty small kernels per layer (norms, rotary embedding, activations) that each cost a
launch and a round trip through memory. Inductor fuses them.

What is compiled is one decoder layer over its part of the cache (``decode_layer``), and the
same compilation serves all the layers: they differ only in their weights, which torch.compile
takes as inputs; each hands its output on through the next layer's input norm, so that the
norm shares a kernel with the layer's last residual add. What comes before the layers
(embedding, the first input norm, rotary embedding, mask) and after them (output head) is
compiled as two more small parts. Compiling the whole step at once
took 210 s on an H200 for GLM-4.1V-9B's 40 layers, and again about as long whenever a new
shape made it compile again, stalling every stream meanwhile (docs/benchmarks.md). Shapes are
compiled as dynamic, so one compilation serves every batch of two rows or more and every cache
length, and without "duck sizing": two sizes that happen to be equal when it compiles (two
rows, two KV heads) are not assumed to stay equal. One row gets a compilation of its own
(torch.compile always treats a size of one apart): a single stream's steps. There, with
coordinate-descent tuning, Inductor turns each matrix multiply into a reduction of its own,
which is how PyTorch's own notes say its matrix-vector products reach peak bandwidth (the GPU
figure for it is still owed).

The first compiled step of each kind (one row, batches), and any step that made torch.compile
compile again, is checked against the eager step; a compilation that fails or disagrees turns
compilation off for the process (with a warning) and decoding goes on eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch._dynamo.utils import counters

from glm4v_bento.engine import decode_attention
from glm4v_bento.engine.decode_graphs import Forward, same_logits
from glm4v_bento.engine.kv_cache import LayerCache
from glm4v_bento.engine.profiled_tuning import ProfiledTuning

logger = logging.getLogger(__name__)

# (layer, next norm, hidden, normed, cos, sin, mask, keys, values, row indices, write column)
# -> the layer's output, and that output through the next norm (then, stored, its MLP's activation)
LayerStep = Callable[..., tuple[torch.Tensor, ...]]

# An experiment, off unless set (gpu_bench's --store-mlp-activation): each decode layer also
# returns its MLP's activation (the up projection times the SiLU of the gate). Inductor always
# stores a graph output, so the activation is computed once; otherwise it is inlined into the
# one-row reduction of the down projection, where each block of output columns computes all of
# its SiLUs again. On an H200 that reduction read its weights at 2.3 TB/s, against 3.2-4.1 TB/s
# for the layer's other projections (docs/benchmarks.md). bench/inductor_kernels.py shows the
# kernels Inductor writes for a GPU either way, on any machine. Off still: on an H200 its gain was
# smaller than the spread between two compilations of the same step, and with the rotary fused too
# there was none over four runs against four (2026-11-27, docs/benchmarks.md).
STORE_MLP_ACTIVATION = False


@dataclass(frozen=True)
class DecodeParts:
    """A decode step in three parts, each run as it is or compiled on its own."""

    # (rows, columns) -> hidden, hidden through the first layer's input norm, cos, sin, mask
    begin: Callable[[int, int], tuple[torch.Tensor, ...]]
    layer: LayerStep  # decode_layer, for each layer in turn
    end: Callable[[torch.Tensor], torch.Tensor]  # the last layer's output, normed -> logits


# (rows, columns, the parts to run) -> logits: the runner's decode step
PartedForward = Callable[[int, int, DecodeParts], torch.Tensor]


def decode_layer(
    layer: torch.nn.Module,
    next_norm: torch.nn.Module,
    hidden: torch.Tensor,
    normed: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    row_indices: torch.Tensor,
    write_column: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One decoder layer of a decode step: transformers' ``Glm4vTextDecoderLayer.forward``, step
    for step, except that its input arrives already through its input norm (``normed``) and its
    output also leaves through the next one (``next_norm``: the next layer's input norm, or the
    model's final norm). That norm then runs in the same kernel as the layer's last residual add
    (one kernel fewer per layer on a GPU, where each costs a launch). Its cache is made here
    from tensors, and the columns it attends over from the mask's shape: nothing is specific to
    one layer."""
    cache = LayerCache(keys, values, row_indices, write_column, columns=mask.shape[-1])
    attended, _ = layer.self_attn(normed, position_embeddings=(cos, sin), attention_mask=mask, cache=cache)
    hidden = hidden + layer.post_self_attn_layernorm(attended)
    if not STORE_MLP_ACTIVATION:
        hidden = hidden + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(hidden)))
        return hidden, next_norm(hidden)
    mlp = layer.mlp  # transformers' Glm4vTextMLP.forward, its activation kept
    mlp_input = layer.post_attention_layernorm(hidden)
    if hidden.shape[0] == 1:
        # One row: the gate and the up projection as two multiplies over the halves of the one
        # weight (views: no memory added). Inductor then computes both reductions in one kernel
        # and the activation once, after them, in the same kernel.
        gate_weight, up_weight = mlp.gate_up_proj.weight.chunk(2)
        gate, up = F.linear(mlp_input, gate_weight), F.linear(mlp_input, up_weight)
    else:
        gate, up = mlp.gate_up_proj(mlp_input).chunk(2, dim=-1)
    activation = up * mlp.activation_fn(gate)
    hidden = hidden + layer.post_mlp_layernorm(mlp.down_proj(activation))
    return hidden, next_norm(hidden), activation


# With this tuning Inductor lowers a one-row matrix multiply (each of a single stream's steps)
# to a reduction of its own, tuned on the device: PyTorch's notes give it as the way its
# matrix-vector products reach peak bandwidth. It also tunes the fused kernels' launch sizes.
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}

# An experiment, off unless added to COMPILE_OPTIONS (gpu_bench's and decode_profile's --fuse-rotary):
# Inductor options under which a one-row step's layer takes 8 Triton kernels instead of 11. As
# served, the queries' rotary embedding takes two kernels and the keys' two more: the rotated half,
# then a copy of the other half, because Inductor lowers the concatenation that joins them as
# copies into slices when its inputs could fuse the q/k/v reduction. The keys then make one more
# trip through memory to the cache write. With a pointwise concatenation, and up to 16 reads
# (4 by default) for a result used more than once before Inductor stores it apart instead of
# inlining it, the queries take one kernel and the keys' rotation runs inside the cache write
# (torch 2.11 and 2.14 alike). Batches' layers are written the same either way: their projection
# is a library GEMM, after which Inductor already fuses so. On an H200 the six small kernels took
# about 8 µs a layer; with the MLP activation stored too, one stream was no faster over four runs
# against four (2026-11-27, docs/benchmarks.md).
# bench/inductor_kernels.py lists the kernels either way, on any machine.
FUSED_ROTARY_OPTIONS = {"force_pointwise_cat": True, "realize_reads_threshold": 16}


class CompiledStep:
    def __init__(
        self,
        forward: PartedForward,
        parts: DecodeParts,
        *,
        profiled_tuning: bool = False,
        split_attention: bool = False,
    ) -> None:
        """``profiled_tuning``: coordinate descent times each candidate launch by its kernel's
        device time, not by events around a launch whose host work outlasts a one-row kernel
        (profiled_tuning.py). ``split_attention``: compiled steps on a GPU attend with the split-KV
        kernels (decode_attention.py)."""
        self.eager: Forward = lambda rows, columns: forward(rows, columns, parts)
        self.options = dict(COMPILE_OPTIONS)  # as they are now: torch.compile takes them at once
        # Tuning runs inside a compiled call, at each new kernel's first launch.
        self.profiled_tuning = ProfiledTuning() if profiled_tuning else None
        tuning = self.profiled_tuning.active if self.profiled_tuning else contextlib.nullcontext
        self.split_attention = split_attention  # read at each call: a change compiles the step again
        compiled_parts = DecodeParts(
            begin=torch.compile(parts.begin, dynamic=True, options=self.options),
            layer=torch.compile(parts.layer, dynamic=True, options=self.options),
            end=torch.compile(parts.end, dynamic=True, options=self.options),
        )

        def compiled(rows: int, columns: int) -> torch.Tensor:
            with (
                fx_config.patch(use_duck_shape=False),  # read when torch.compile traces
                tuning(),
                decode_attention.split_attention_on(self.split_attention),
            ):
                return forward(rows, columns, compiled_parts)

        self.compiled: Forward = compiled
        self.enabled = True
        self._checked: set[str] = set()  # the variants compiled and checked: one row, batches
        self.compilations = 0  # each one, expected or not, with the seconds they took
        self.compile_seconds = 0.0

    @property
    def checked(self) -> bool:
        return bool(self._checked)

    def __call__(self, rows: int, columns: int) -> torch.Tensor:
        if not self.enabled:
            return self.eager(rows, columns)
        variant = "one row" if rows == 1 else "batches"
        if variant not in self._checked:
            return self._checked_call(rows, columns, variant)
        compilations = _compilations()
        started = time.perf_counter()
        logits = self.compiled(rows, columns)
        if _compilations() != compilations:  # compiled again (a shape or guard it had not seen): check it too
            self._count(started)
            logger.warning(
                "the decode step was compiled again, for %d rows x %d columns, in %.1f s",
                rows,
                columns,
                time.perf_counter() - started,
            )
            reference = self.eager(rows, columns)
            if not same_logits(logits, reference):
                return self._turn_off(reference, "the recompiled decode step disagreed with the eager step")
        return logits

    def _checked_call(self, rows: int, columns: int, variant: str) -> torch.Tensor:
        reference = self.eager(rows, columns).clone()
        logger.info("compiling the decode step for %s with torch.compile ...", variant)
        started = time.perf_counter()
        try:
            logits = self.compiled(rows, columns)
        except Exception:  # any failure means: decode without compiling
            logger.warning("compiling the decode step failed", exc_info=True)
            return self._turn_off(reference, "compiling the decode step failed")
        if not same_logits(logits, reference):
            return self._turn_off(reference, "the compiled decode step disagreed with the eager step")
        self._count(started)
        logger.info("compiled the decode step for %s in %.1f s", variant, time.perf_counter() - started)
        self._checked.add(variant)
        return logits

    def _count(self, started: float) -> None:
        self.compilations += 1
        self.compile_seconds += time.perf_counter() - started

    def _turn_off(self, reference: torch.Tensor, why: str) -> torch.Tensor:
        logger.warning("%s; decoding eagerly from now on", why)
        self.enabled = False
        return reference


def _compilations() -> int:
    """Graphs compiled so far in this process (torch.compile's own count)."""
    return counters["stats"]["unique_graphs"]
