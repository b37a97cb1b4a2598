"""Tensors in, logits out: the prefill of new rows and one decode step of the running batch.

Positions are computed here (multimodal RoPE, per row) and passed to the model explicitly,
so the model's own per-call ``rope_deltas`` state is never relied on.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from glm4v_bento.engine.batch import BatchState
from glm4v_bento.engine.loader import LoadedModel
from glm4v_bento.engine.prompt import PreparedPrompt


class ModelRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        # The checkpoint's vocabulary is padded past the tokenizer; those ids are never text.
        self._vocab_limit = len(loaded.tokenizer)

    @torch.inference_mode()
    def prefill(self, prompts: list[PreparedPrompt]) -> tuple[BatchState, torch.Tensor]:
        """Run new prompts (images through the vision encoder once) -> their batch and last logits."""
        batch = self._collate(prompts)
        position_ids, rope_deltas = self.model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            video_grid_thw=batch["video_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        cache = DynamicCache(config=self.model.config)
        output = self.model(
            inputs_embeds=self._embed(batch),
            attention_mask=batch["attention_mask"],
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state = BatchState(
            cache=cache,
            attention_mask=batch["attention_mask"],
            lengths=batch["attention_mask"].sum(dim=-1),
            rope_deltas=rope_deltas,
        )
        return state, self._mask_padded_vocab(output.logits[:, -1])

    @torch.inference_mode()
    def decode(self, state: BatchState, tokens: list[int]) -> torch.Tensor:
        """Feed each row its last sampled token -> next-token logits (rows in state order)."""
        positions = state.next_positions()
        state.append_column()
        logits = self.model(
            input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1),
            attention_mask=state.attention_mask,
            position_ids=positions,
            cache=state.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return self._mask_padded_vocab(logits)

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
            parts = [getattr(p, name) for p in prompts if getattr(p, name) is not None]
            return torch.cat(parts).to(self.device) if parts else None

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

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] > self._vocab_limit:
            logits = logits.clone()
            logits[:, self._vocab_limit :] = float("-inf")
        return logits
