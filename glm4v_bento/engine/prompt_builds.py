"""Prompts built on a thread of their own, ahead of admission.

Building a prompt resizes, normalises and cuts its images into patches: on a CPU, about 110 ms
for one 12-megapixel photo and 420 ms for four (docs/benchmarks.md, "Large images arriving
while streams run"). Built on the scheduler thread, that time was a pause in every running
stream. Here the prompts of the requests next in line are built as they arrive; the scheduler
admits those that are ready and keeps decoding meanwhile.

One worker: prompts are then ready in the order the requests came, no more of them are held in
memory (their pixel values) than the scheduler asks for, and the tokenizer is never used by two
builds at once (transformers sets on the shared tokenizer object, at each call, whether
special-token strings count as special: PromptBuilder switches that between client and template
text).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from glm4v_bento.engine.prompt import PreparedPrompt
from glm4v_bento.engine.types import GenerationRequest


class PromptBuilds:
    def __init__(self, build: Callable[[GenerationRequest], PreparedPrompt], on_ready: Callable[[], None]) -> None:
        """``build`` runs on the worker; ``on_ready`` is called there after each build, done or failed."""
        self._build = build
        self._on_ready = on_ready
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glm4v-prompts")

    def start(self, request: GenerationRequest) -> Future[PreparedPrompt]:
        future = self._pool.submit(self._build, request)
        future.add_done_callback(lambda _: self._on_ready())
        return future

    def close(self) -> None:
        """Builds not yet started are dropped; the one under way finishes on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
