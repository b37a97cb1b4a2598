"""The decode step compiled with torch.compile: elementwise work fused into few kernels.

A decode step of a 9B model is dominated by reading the weights, but eager PyTorch adds
about fifty small kernels per layer (norms, rotary embedding, activations) that each cost a
launch and a round trip through memory. Inductor fuses them. Shapes are compiled as dynamic,
so one compilation serves every batch size and cache length (the one-row case is never
compiled: callers pad it to two rows).

The first compiled step is checked against the eager step; a compilation that fails or
disagrees turns compilation off for the process (with a warning) and decoding goes on eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from glm4v_bento.engine.decode_graphs import Forward, same_logits

logger = logging.getLogger(__name__)


class CompiledStep:
    def __init__(self, eager: Forward) -> None:
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=True)
        self.enabled = True
        self.checked = False

    def __call__(self, rows: int, columns: int) -> torch.Tensor:
        if not self.enabled:
            return self.eager(rows, columns)
        if self.checked:
            return self.compiled(rows, columns)
        return self._first_call(rows, columns)

    def _first_call(self, rows: int, columns: int) -> torch.Tensor:
        reference = self.eager(rows, columns).clone()
        logger.info("compiling the decode step with torch.compile (the first time takes a while) ...")
        started = time.perf_counter()
        try:
            logits = self.compiled(rows, columns)
        except Exception:  # any failure means: decode without compiling
            logger.warning("compiling the decode step failed; decoding eagerly", exc_info=True)
            self.enabled = False
            return reference
        if not same_logits(logits, reference):
            logger.warning("the compiled decode step disagreed with the eager step; decoding eagerly")
            self.enabled = False
            return reference
        logger.info("compiled the decode step in %.1f s", time.perf_counter() - started)
        self.checked = True
        return logits
