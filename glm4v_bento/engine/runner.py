"""Tensors in, logits out: the prefill of new rows and one decode step of the running batch.

Positions are computed here (multimodal RoPE, per row) and passed to the model explicitly,
so the model's own per-call ``rope_deltas`` state is never relied on.

Prefill runs the vision encoder once per admitted group, then the language model over the
prompt, in chunks of at most ``prefill_chunk_tokens`` (the scheduler decodes the running batch
between two chunks, so a long prompt does not stall it), and hands the keys and values to the
running batch's static cache. A decode step runs the language
model's own layers over that cache, with queries, keys and values projected by one matrix
multiply and each layer's output handed on through the next layer's input norm; on a single
CUDA device each layer is compiled with torch.compile and the step replayed from CUDA graphs.
A model that accelerate spread over devices or offloaded runs each layer through its own
forward instead, where accelerate's hooks move its inputs and weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from glm4v_bento.engine import decode_attention, fused_qkv
from glm4v_bento.engine.compiled_step import CompiledStep, DecodeParts, decode_layer
from glm4v_bento.engine.decode_graphs import Capture, DecodeGraphs, Forward, cuda_capture
from glm4v_bento.engine.kv_cache import LayerCache, StaticKVCache
from glm4v_bento.engine.loader import LoadedModel
from glm4v_bento.engine.prompt import PreparedPrompt

logger = logging.getLogger(__name__)

# On CUDA, SDPA has memory-efficient kernels for a chunk's masked attention over its cache (the
# GPU figures are still owed); on the CPU that attention costs more than the whole prompt's
# causal one (docs/benchmarks.md), so prompts are prefilled whole there.
AUTO_PREFILL_CHUNK_TOKENS = 2048


@dataclass
class Prefilled:
    """New rows after their prefill, not yet part of the running batch."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # (rows, prompt columns), left-padded
    positions: torch.Tensor  # (rows,): text position of each row's next token
    lengths: list[int]


@dataclass
class PrefillJob:
    """A group's prefill in progress: its prompts embedded, ``done`` columns run so far."""

    embeds: torch.Tensor  # (rows, columns, hidden), images already written in
    attention_mask: torch.Tensor  # (rows, columns), left-padded
    position_ids: torch.Tensor  # (3, rows, columns): multimodal positions
    rope_deltas: torch.Tensor
    lengths: list[int]
    cache: DynamicCache
    done: int = 0

    @property
    def columns(self) -> int:
        return self.embeds.shape[1]


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_rows: int = 32,
        cuda_graphs: bool = True,
        compile_decode: bool | None = None,
        prefill_chunk_tokens: int | None = None,
        fuse_qkv: bool = True,
        split_attention: bool = True,
        profiled_tuning: bool = True,
    ) -> None:
        """``compile_decode``: torch.compile the decode step (None: on a single CUDA device only).
        ``split_attention``: a compiled decode step on a GPU attends with the split-KV
        kernels (decode_attention.py). ``profiled_tuning``: on a GPU, the compiled step's kernels
        are tuned by their profiled device time (profiled_tuning.py).
        ``prefill_chunk_tokens``: the most prompt columns one prefill step runs (0: all; None:
        AUTO_PREFILL_CHUNK_TOKENS on CUDA, all elsewhere). ``fuse_qkv``: decode with one matrix
        multiply for queries, keys and values (``fused_qkv``; False, to measure it, leaves a model
        fused by an earlier runner as it is)."""
        self.loaded = loaded
        self.model = loaded.model
        self.device = _with_index(loaded.device)
        if prefill_chunk_tokens is None:
            prefill_chunk_tokens = AUTO_PREFILL_CHUNK_TOKENS if self.device.type == "cuda" else 0
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._text_model = self.model.model.language_model
        # The checkpoint's vocabulary is padded past the tokenizer; those ids are never text.
        self._vocab_limit = len(loaded.tokenizer)
        if fuse_qkv:
            fused_qkv.fuse_qkv(self._text_model)
        # accelerate's hooks (a model spread over devices, or offloaded) run in each layer's own forward.
        self._dispatched = any(hasattr(module, "_hf_hook") for module in self._text_model.modules())
        # Each layer hands on its output through the norm that comes next (decode_layer).
        layers = list(self._text_model.layers)
        self._next_norms = [layer.input_layernorm for layer in layers[1:]] + [self._text_model.norm]
        self.cache = StaticKVCache(
            self.model.config.get_text_config(), device=self.device, dtype=loaded.dtype, max_rows=max_rows
        )
        self.one_gpu = self._single_cuda_device()  # the whole model on one CUDA device: the fast paths' condition
        self._eager_parts = DecodeParts(begin=self._decode_begin, layer=decode_layer, end=self._decode_end)
        self.compiled: CompiledStep | None = None
        # Kept for compile_anew. Tuning exists only for a GPU's (Triton) kernels.
        self._compile_choices = {
            "split_attention": split_attention,
            "profiled_tuning": profiled_tuning and self.device.type == "cuda",
        }
        if compile_decode if compile_decode is not None else self.one_gpu:
            self.compiled = CompiledStep(self._forward, self._eager_parts, **self._compile_choices)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.one_gpu:
            self.use_graphs(cuda_capture())

    def compile_anew(self) -> None:
        """A new compiled decode step, with ``compiled_step.COMPILE_OPTIONS`` as they are now (its
        first step compiles, and is checked, again): benchmarks comparing options in one process.
        Steps replayed from graphs would keep the old step, so it is for a runner without them."""
        if self.graphs is not None:
            raise RuntimeError("compile_anew is for a runner without CUDA graphs")
        self.compiled = CompiledStep(self._forward, self._eager_parts, **self._compile_choices)

    def use_graphs(self, capture: Capture) -> DecodeGraphs:
        """Decode through graphs recorded by ``capture`` (the CUDA one, or a stand-in in tests)."""
        self.graphs = DecodeGraphs(self.cache, self._step, self._forward, capture)
        return self.graphs

    @property
    def _step(self) -> Forward:
        """A decode step as it runs without graphs (and as graphs record it): compiled, or as it is."""
        return self.compiled or self._forward

    @property
    def rows(self) -> int:
        return self.cache.rows

    def decode_path(self) -> dict[str, bool | int]:
        """How decode steps run now (a check that failed shows as False here, and in the log)."""
        return {
            "compiled": self.compiled is not None and self.compiled.enabled,
            "cuda_graphs": self.graphs is not None and self.graphs.enabled,
            "cuda_graphs_captured": self.graphs.captured if self.graphs is not None else 0,
            "fused_qkv_layers": fused_qkv.fused_layers(self._text_model),
        }

    def prefill(self, prompts: list[PreparedPrompt]) -> tuple[Prefilled, torch.Tensor]:
        """Run new prompts to the end now -> their rows and last logits."""
        job = self.begin_prefill(prompts)
        while (done := self.prefill_step(job)) is None:
            pass
        return done

    @torch.inference_mode()
    def begin_prefill(self, prompts: list[PreparedPrompt]) -> PrefillJob:
        """Embed new prompts (their images through the vision encoder, once) for ``prefill_step``."""
        batch = self._collate(prompts)
        position_ids, rope_deltas = self.model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            video_grid_thw=batch["video_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        return PrefillJob(
            embeds=self._embed(batch),
            attention_mask=batch["attention_mask"],
            position_ids=position_ids,
            rope_deltas=rope_deltas,
            lengths=[p.num_tokens for p in prompts],
            cache=DynamicCache(config=self.model.config),
        )

    @torch.inference_mode()
    def prefill_step(self, job: PrefillJob) -> tuple[Prefilled, torch.Tensor] | None:
        """Run the job's next chunk of columns; after the last, its rows and their last logits."""
        start = job.done
        end = job.columns if not self.prefill_chunk_tokens else min(job.columns, start + self.prefill_chunk_tokens)
        output = self.model(
            inputs_embeds=job.embeds[:, start:end],
            attention_mask=job.attention_mask[:, :end],  # every column so far: the cache holds the rest
            position_ids=job.position_ids[..., start:end],
            cache=job.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        job.done = end
        if end < job.columns:
            return None
        # A text token's position is its index among the row's real tokens plus the row's delta.
        positions = torch.tensor(job.lengths, device=job.rope_deltas.device) + job.rope_deltas.view(-1)
        logits = output.logits[:, -1].to(self.device)  # where sampling's generators live
        self._mask_padded_vocab(logits)
        return Prefilled(job.cache, job.attention_mask, positions, job.lengths), logits

    @torch.inference_mode()
    def join(self, prefilled: Prefilled) -> None:
        """Append prefilled rows after the running ones."""
        layers = [(layer.keys, layer.values) for layer in prefilled.cache.layers]
        self.cache.join(layers, prefilled.attention_mask, prefilled.positions, prefilled.lengths)

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Keep only these running rows, in this order (the others finished or were cancelled)."""
        self.cache.keep(rows)

    def clear(self) -> None:
        self.cache.clear()

    @torch.inference_mode()
    def decode(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed each running row its last sampled token (a list, or a tensor already on the model's
        device) -> next-token logits (rows in order)."""
        rows = self.cache.rows
        # The scheduler thread's current CUDA device is cuda:0 whatever the model's: graphs are
        # captured on the current device's streams, so it must be the model's.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            columns = self.cache.prepare_step(tokens)
            step = self.graphs.run if self.graphs is not None else self._step
            logits = step(rows, columns)
            self.cache.finish_step()
        return logits.to(self.device)  # a model spread over devices ends on its last one

    def _forward(self, rows: int, columns: int, parts: DecodeParts | None = None) -> torch.Tensor:
        """One decode step of ``rows`` rows attending over ``columns`` cache columns; every input
        is read from the cache's fixed buffers, so a CUDA graph can record it as it is.
        ``parts``: its parts compiled (eager when None)."""
        if self._dispatched:
            return self._forward_dispatched(rows, columns)
        parts = parts or self._eager_parts
        cache, text = self.cache, self._text_model
        hidden, normed, cos, sin, mask = parts.begin(rows, columns)
        with _decode_attention(text.config):
            for index, (layer, next_norm) in enumerate(zip(text.layers, self._next_norms, strict=True)):
                hidden, normed = parts.layer(
                    layer, next_norm, hidden, normed, cos, sin, mask, *cache.layer_buffers(index)
                )[:2]
        return parts.end(normed)

    def _forward_dispatched(self, rows: int, columns: int) -> torch.Tensor:
        """The decode step of a model that accelerate spread over devices or offloaded: each layer
        runs through its own forward, where accelerate's hooks bring its inputs and weights to
        where it runs (a norm handed on from one layer to the next would miss them)."""
        cache, text = self.cache, self._text_model
        hidden, cos, sin, mask = self._decode_inputs(rows, columns)
        with _decode_attention(text.config):
            for index, layer in enumerate(text.layers):
                layer_cache = LayerCache(*cache.layer_buffers(index), columns=columns)
                hidden = layer(hidden, position_embeddings=(cos, sin), attention_mask=mask, cache=layer_cache)
        return self._decode_end(text.norm(hidden))

    def _decode_begin(self, rows: int, columns: int) -> tuple[torch.Tensor, ...]:
        """The running rows' next tokens embedded (as they are, and through the first layer's
        input norm), their rotary embedding and attention mask."""
        hidden, cos, sin, mask = self._decode_inputs(rows, columns)
        return hidden, self._text_model.layers[0].input_layernorm(hidden), cos, sin, mask

    def _decode_inputs(self, rows: int, columns: int) -> tuple[torch.Tensor, ...]:
        """The running rows' next tokens embedded, their rotary embedding and attention mask."""
        cache, text = self.cache, self._text_model
        hidden = text.embed_tokens(cache.tokens[:rows].unsqueeze(1))
        positions = cache.positions[:rows].view(1, rows, 1).expand(3, rows, 1)
        cos, sin = text.rotary_emb(hidden, position_ids=positions)
        # Made additive once here rather than converted from boolean by each of the layers.
        mask = torch.zeros((rows, 1, 1, columns), dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~cache.mask[:rows, :, :, :columns], torch.finfo(hidden.dtype).min)
        return hidden, cos, sin, mask

    def _decode_end(self, normed: torch.Tensor) -> torch.Tensor:
        """The last layer's output, already through the final norm -> logits."""
        logits = self.model.lm_head(normed[:, -1])
        self._mask_padded_vocab(logits)
        return logits

    def _single_cuda_device(self) -> bool:
        if self.device.type != "cuda":
            return False
        devices = {p.device for p in self.model.parameters()}
        if devices != {self.device}:
            logger.info("the model spans %s: decoding without CUDA graphs", sorted(map(str, devices)))
            return False
        return True

    def _collate(self, prompts: list[PreparedPrompt]) -> dict[str, torch.Tensor | None]:
        """Left-pad the prompts into one batch; vision inputs are concatenated in row order."""
        width = max(p.num_tokens for p in prompts)
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mm_types = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            n = prompt.num_tokens
            input_ids[row, width - n :] = torch.tensor(prompt.input_ids)
            mm_types[row, width - n :] = torch.tensor(prompt.mm_token_type_ids)
            mask[row, width - n :] = 1

        def cat(name: str) -> torch.Tensor | None:
            # Each part to the device, then joined there: no copy of all the pixels on the host
            # first, and from pinned memory (PromptBuilder's pin_memory) the copies do not block.
            parts = [getattr(p, name) for p in prompts if getattr(p, name) is not None]
            return torch.cat([part.to(self.device, non_blocking=True) for part in parts]) if parts else None

        return {
            "input_ids": input_ids.to(self.device),
            "mm_token_type_ids": mm_types.to(self.device),
            "attention_mask": mask.to(self.device),
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
        model = self.model
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

    def _mask_padded_vocab(self, logits: torch.Tensor) -> None:
        if logits.shape[-1] > self._vocab_limit:
            logits[:, self._vocab_limit :] = float("-inf")


@contextmanager
def _decode_attention(text_config) -> Iterator[None]:
    """Decode has its own attention whichever kernel prefill uses: it takes the step's mask as
    it is, reads the KV heads without repeating them, and never syncs."""
    configured = text_config._attn_implementation
    text_config._attn_implementation = decode_attention.NAME
    try:
        yield
    finally:
        text_config._attn_implementation = configured


def _with_index(device: torch.device) -> torch.device:
    """ "cuda" -> "cuda:0" (the current one): parameters report an index, and graphs need the right device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
