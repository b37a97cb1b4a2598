"""The generation engine: one worker thread owns the model and runs batches on it.

GLM-4.1V keeps per-call state on the model (``rope_deltas``), so two generations must
never run on it at once. Callers submit work to a queue; the worker takes one job at a
time, first come first served, and runs all of its requests as one left-padded batch.
Each row is sampled with its own parameters and leaves the batch as soon as it is done.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from glm4v_bento.config import Settings
from glm4v_bento.engine.loader import LoadedModel, load_model
from glm4v_bento.engine.prompt import PromptBuilder, PromptError
from glm4v_bento.engine.sampling import sample_next_tokens
from glm4v_bento.engine.sequence import Sequence
from glm4v_bento.engine.types import ErrorType, GenerationRequest, GenerationResult, Timings, Usage

logger = logging.getLogger(__name__)


class EngineClosedError(RuntimeError):
    """The engine was shut down and takes no more work."""


@dataclass
class _Job:
    requests: list[GenerationRequest]
    future: Future
    submitted_at: float


class Engine:
    def __init__(self, loaded: LoadedModel, *, default_max_new_tokens: int = 8192, max_images: int = 8) -> None:
        self.loaded = loaded
        self.default_max_new_tokens = default_max_new_tokens
        self.prompts = PromptBuilder(loaded.processor, max_images=max_images)
        # The checkpoint's vocabulary is padded past the tokenizer; those ids are never text.
        self._vocab_limit = len(loaded.tokenizer)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting_requests = 0
        self._running_requests = 0
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="glm4v-engine", daemon=True)
        self._worker.start()

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
        return cls(
            loaded,
            default_max_new_tokens=settings.default_max_new_tokens,
            max_images=settings.max_images_per_request,
        )

    # --- public API

    def submit(self, requests: list[GenerationRequest]) -> Future:
        """Queue ``requests`` to run as one batch; the future resolves to their results, in order."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            self._waiting_requests += len(requests)
            self._jobs.put(_Job(list(requests), future, time.perf_counter()))
        return future

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self.submit(requests).result()

    async def generate_async(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return await asyncio.wrap_future(self.submit(requests))

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model (not counting the batch that runs now)."""
        return self._waiting_requests

    @property
    def running(self) -> int:
        return self._running_requests

    def close(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._worker.join(timeout)

    # --- worker

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting_requests -= len(job.requests)
                self._running_requests = len(job.requests)
            try:
                job.future.set_result(self._run_job(job))
            except BaseException as exc:  # the caller must always hear back
                logger.exception("generation job failed")
                job.future.set_exception(exc)
            finally:
                self._running_requests = 0

    def _run_job(self, job: _Job) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(job.requests)
        sequences: dict[int, Sequence] = {}
        for i, request in enumerate(job.requests):
            try:
                sequences[i] = self._prepare(request, job.submitted_at)
            except (PromptError, ValueError) as exc:
                results[i] = _error_result(request, str(exc), "invalid_request", job.submitted_at)
        try:
            self._generate(list(sequences.values()))
        except Exception as batch_error:
            logger.exception("generation of a batch of %d failed", len(sequences))
            # Find the row that breaks the batch: rerun each alone so the others still succeed.
            retry_alone = len(sequences) > 1
            for i in list(sequences):
                error: Exception = batch_error
                if retry_alone:
                    try:
                        sequences[i] = self._prepare(job.requests[i], job.submitted_at)
                        self._generate([sequences[i]])
                        continue
                    except Exception as exc:
                        logger.exception("request %s failed alone", job.requests[i].request_id)
                        error = exc
                message = f"generation failed on the server ({type(error).__name__})"
                results[i] = _error_result(job.requests[i], message, "internal", job.submitted_at)
                del sequences[i]
        for i, seq in sequences.items():
            results[i] = seq.result()
        return [r for r in results if r is not None]

    def _prepare(self, request: GenerationRequest, submitted_at: float) -> Sequence:
        prompt = self.prompts.build(request)
        budget = self.loaded.max_context - prompt.num_tokens
        asked = request.params.max_new_tokens
        if budget < 1:
            raise PromptError(
                f"the prompt is {prompt.num_tokens} tokens, which fills the model's context of "
                f"{self.loaded.max_context} tokens"
            )
        if asked is not None and asked > budget:
            raise PromptError(
                f"the prompt is {prompt.num_tokens} tokens and max_new_tokens is {asked}: together they "
                f"exceed the model's context of {self.loaded.max_context} tokens "
                f"(at most {budget} new tokens fit)"
            )
        return Sequence(
            request,
            prompt,
            max_new_tokens=asked if asked is not None else min(self.default_max_new_tokens, budget),
            tokenizer=self.loaded.tokenizer,
            eos_token_ids=self.loaded.eos_token_ids,
            device=self.loaded.device,
            submitted_at=submitted_at,
        )

    # --- the batch itself

    @torch.inference_mode()
    def _generate(self, sequences: list[Sequence]) -> None:
        if not sequences:
            return
        model = self.loaded.model
        started = time.perf_counter()
        for seq in sequences:
            seq.started_at = started

        batch = self._collate(sequences)
        position_ids, rope_deltas = model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            video_grid_thw=batch["video_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        attention_mask = batch["attention_mask"]
        cache = DynamicCache(config=model.config)
        output = model(
            inputs_embeds=self._embed(batch),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = output.logits[:, -1]
        lengths = attention_mask.sum(dim=-1)  # real tokens per row so far
        prefill_done = time.perf_counter()
        for seq in sequences:
            seq.prefill_done_at = prefill_done

        active = list(sequences)
        while True:
            tokens = sample_next_tokens(self._mask_padded_vocab(logits), active)
            for seq, token in zip(active, tokens, strict=True):
                seq.append(token)
            keep = [row for row, seq in enumerate(active) if not seq.finished]
            if not keep:
                return
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=attention_mask.device)
                cache.batch_select_indices(rows)
                attention_mask, lengths, rope_deltas = attention_mask[rows], lengths[rows], rope_deltas[rows]
                active = [active[row] for row in keep]
                tokens = [tokens[row] for row in keep]
            next_ids = torch.tensor(tokens, device=attention_mask.device).unsqueeze(1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
            # Text positions continue from each row's last multimodal RoPE position.
            positions = (lengths + rope_deltas.squeeze(1)).view(1, -1, 1).expand(3, -1, 1)
            logits = model(
                input_ids=next_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            lengths = lengths + 1

    def _collate(self, sequences: list[Sequence]) -> dict[str, torch.Tensor | None]:
        """Left-pad the prompts into one batch; vision inputs are concatenated in row order."""
        device = self.loaded.device
        width = max(seq.prompt.num_tokens for seq in sequences)
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mm_types = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            n = seq.prompt.num_tokens
            input_ids[row, width - n :] = torch.tensor(seq.prompt.input_ids)
            mm_types[row, width - n :] = torch.tensor(seq.prompt.mm_token_type_ids)
            mask[row, width - n :] = 1

        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(seq.prompt, name) for seq in sequences if getattr(seq.prompt, name) is not None]
            return torch.cat(parts).to(device) if parts else None

        return {
            "input_ids": input_ids.to(device),
            "mm_token_type_ids": mm_types.to(device),
            "attention_mask": mask.to(device),
            "pixel_values": cat("pixel_values"),
            "image_grid_thw": cat("image_grid_thw"),
            "pixel_values_videos": cat("pixel_values_videos"),
            "video_grid_thw": cat("video_grid_thw"),
        }

    def _embed(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Token embeddings with image and video features written into their placeholder slots.

        Done here rather than inside the model's forward because GLM-4.1V marks image and
        video frames with the same token id: only ``mm_token_type_ids`` tells them apart,
        which lets one batch mix image rows and video rows.
        """
        model = self.loaded.model
        embeds = model.get_input_embeddings()(batch["input_ids"])
        vision = (
            (1, batch["pixel_values"], batch["image_grid_thw"], model.model.get_image_features),
            (2, batch["pixel_values_videos"], batch["video_grid_thw"], model.model.get_video_features),
        )
        for type_id, pixels, grid, encode in vision:
            if pixels is None:
                continue
            features = encode(pixels.to(self.loaded.dtype), grid, return_dict=True).pooler_output
            features = torch.cat(features).to(embeds.dtype)
            slots = (batch["mm_token_type_ids"] == type_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, features)
        return embeds

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] > self._vocab_limit:
            logits = logits.clone()
            logits[:, self._vocab_limit :] = float("-inf")
        return logits


def _error_result(
    request: GenerationRequest, message: str, error_type: ErrorType, submitted_at: float
) -> GenerationResult:
    elapsed = time.perf_counter() - submitted_at
    return GenerationResult(
        request_id=request.request_id,
        text="",
        thinking="",
        answer="",
        finish_reason="error",
        error=message,
        error_type=error_type,
        usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
        timings=Timings(queue_s=elapsed, prefill_s=0.0, decode_s=0.0, total_s=elapsed),
    )
