"""The decode step compiled with torch.compile: elementwise work fused into few kernels.

A decode step of a 9B model is dominated by reading the weights, but eager PyTorch adds
about fifty small kernels per layer (norms, rotary embedding, activations) that each cost a
launch and a round trip through memory. Inductor fuses them. Shapes are compiled as dynamic,
so one compilation serves every batch size and cache length (the one-row case is never
compiled: callers pad it to two rows).

The first compiled step, and any step that made torch.compile compile again, is checked
against the eager step; a compilation that fails or disagrees turns compilation off for the
process (with a warning) and decoding goes on eagerly.
"""

from __future__ import annotations

import logging
import time

import torch
from torch._dynamo.utils import counters

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
        if not self.checked:
            return self._checked_call(rows, columns, "compiling the decode step with torch.compile (a while) ...")
        compilations = _compilations()
        logits = self.compiled(rows, columns)
        if _compilations() != compilations:  # compiled again (a shape or guard it had not seen): check it too
            logger.warning("the decode step was compiled again, for %d rows x %d columns", rows, columns)
            reference = self.eager(rows, columns)
            if not same_logits(logits, reference):
                return self._turn_off(reference, "the recompiled decode step disagreed with the eager step")
        return logits

    def _checked_call(self, rows: int, columns: int, note: str) -> torch.Tensor:
        reference = self.eager(rows, columns).clone()
        logger.info(note)
        started = time.perf_counter()
        try:
            logits = self.compiled(rows, columns)
        except Exception:  # any failure means: decode without compiling
            logger.warning("compiling the decode step failed", exc_info=True)
            return self._turn_off(reference, "compiling the decode step failed")
        if not same_logits(logits, reference):
            return self._turn_off(reference, "the compiled decode step disagreed with the eager step")
        logger.info("compiled the decode step in %.1f s", time.perf_counter() - started)
        self.checked = True
        return logits

    def _turn_off(self, reference: torch.Tensor, why: str) -> torch.Tensor:
        logger.warning("%s; decoding eagerly from now on", why)
        self.enabled = False
        return reference


def _compilations() -> int:
    """Graphs compiled so far in this process (torch.compile's own count)."""
    return counters["stats"]["unique_graphs"]
