"""The generation engine: the public face of the scheduler that owns the model.

GLM-4.1V keeps per-call state on the model (``rope_deltas``), so two generations must never
run on it at once: one scheduler thread runs everything, and callers only submit requests
and wait for (or stream) their results.
"""

from __future__ import annotations

import asyncio

from glm4v_bento.config import Settings
from glm4v_bento.engine.errors import QueueFullError
from glm4v_bento.engine.handle import RequestHandle
from glm4v_bento.engine.loader import LoadedModel, load_model
from glm4v_bento.engine.prompt import PromptBuilder
from glm4v_bento.engine.runner import ModelRunner
from glm4v_bento.engine.scheduler import Scheduler, SchedulerLimits
from glm4v_bento.engine.types import GenerationRequest, GenerationResult, SamplingDefaults


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        default_max_new_tokens: int = 8192,
        max_images: int = 8,
        limits: SchedulerLimits | None = None,
        cuda_graphs: bool = True,
        compile_decode: bool | None = None,
        prefill_chunk_tokens: int | None = None,
        sampling_defaults: SamplingDefaults | None = None,
        fuse_qkv: bool = True,
        overlap_steps: bool | None = None,
        split_attention: bool = True,
        profiled_tuning: bool = True,
    ) -> None:
        """``overlap_steps``: launch each decode step before reading back the tokens of the one
        before (overlap.py). None: on when the model sits on one GPU, where the host's work on a
        step then runs while the device computes the next; off elsewhere. ``split_attention`` and
        ``profiled_tuning``: how a compiled step attends and is tuned on a GPU (ModelRunner)."""
        self.loaded = loaded
        self.default_max_new_tokens = default_max_new_tokens
        # Unset sampling fields of every request: the model's recommendation unless overridden.
        self.sampling_defaults = sampling_defaults or loaded.sampling_defaults
        self.prompts = PromptBuilder(loaded.processor, max_images=max_images, pin_memory=loaded.device.type == "cuda")
        limits = limits or SchedulerLimits()
        self.runner = ModelRunner(
            loaded,
            max_rows=limits.max_running,
            cuda_graphs=cuda_graphs,
            compile_decode=compile_decode,
            prefill_chunk_tokens=prefill_chunk_tokens,
            fuse_qkv=fuse_qkv,
            split_attention=split_attention,
            profiled_tuning=profiled_tuning,
        )
        self.scheduler = Scheduler(
            self.runner,
            self.prompts,
            limits,
            default_max_new_tokens=default_max_new_tokens,
            sampling_defaults=self.sampling_defaults,
            overlap_steps=overlap_steps if overlap_steps is not None else self.runner.one_gpu,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """Load the configured model and wrap it in an engine with the configured bounds."""
        loaded = load_model(
            settings.model,
            revision=settings.revision,
            device=settings.device,
            dtype=settings.dtype,
            attn_implementation=settings.attn_implementation,
            device_map=settings.device_map,
            max_memory=settings.max_memory,
            offload_folder=settings.offload_folder,
        )
        limits = SchedulerLimits(
            max_running=settings.max_running,
            max_batch_tokens=settings.max_batch_tokens,
            max_waiting=settings.max_queue,
            policy=settings.scheduler,
        )
        return cls(
            loaded,
            default_max_new_tokens=settings.default_max_new_tokens,
            max_images=settings.max_images_per_request,
            limits=limits,
            cuda_graphs=settings.cuda_graphs,
            compile_decode=settings.compile_decode,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            overlap_steps=settings.overlap_steps,
            split_attention=settings.split_attention,
            profiled_tuning=settings.profiled_tuning,
            sampling_defaults=SamplingDefaults() if settings.sampling_defaults == "greedy" else None,
        )

    def submit(self, request: GenerationRequest, *, stream: bool = False) -> RequestHandle:
        """Queue one request. Raises QueueFullError when the wait queue is full."""
        return self.scheduler.submit(request, stream=stream)

    def submit_many(self, requests: list[GenerationRequest]) -> list[RequestHandle | QueueFullError]:
        """Queue several requests together; each gets a handle or the QueueFullError that refused it."""
        return self.scheduler.submit_many(requests)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` (admitted together when there is room) and return their results in order."""
        return [handle.result() for handle in self.submit_all(requests)]

    async def generate_async(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        handles = self.submit_all(requests)
        try:
            return list(await asyncio.gather(*(handle.wait() for handle in handles)))
        except asyncio.CancelledError:
            for handle in handles:
                handle.abandon()
            raise

    def cancel(self, request_id: str) -> bool:
        """Cancel a submitted request by id; False if it is not (or no longer) known."""
        return self.scheduler.cancel(request_id)

    def submit_all(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue requests that start together or not at all: a QueueFullError for any of them
        withdraws the others and is raised."""
        outcomes = self.scheduler.submit_many(requests)
        refused = [o for o in outcomes if isinstance(o, QueueFullError)]
        if refused:
            for outcome in outcomes:  # all or nothing: do not leave half a batch running
                if isinstance(outcome, RequestHandle):
                    outcome.cancel()
            raise refused[0]
        return outcomes

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""
        return self.scheduler.waiting

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return self.scheduler.running

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving on its own (its scheduler died), or None while it can serve."""
        return self.scheduler.failure

    def drain(self, grace_s: float) -> None:
        """Stop taking requests, let the admitted ones finish for up to ``grace_s``, end the rest."""
        self.scheduler.drain(grace_s)

    def close(self, timeout: float | None = 30.0) -> None:
        self.scheduler.close(timeout)
