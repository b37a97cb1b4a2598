"""Turn a ``GenerationRequest`` into model inputs, keeping user text as text.

The checkpoint's own chat template decides the prompt layout. Client text never passes
through it: each text is swapped for a sentinel before rendering, and afterwards the
template's pieces are tokenized with special tokens while the client's pieces are
tokenized so that no string in them (``<|image|>``, ``[gMASK]``...) can become a special
token. Image placeholders therefore come only from the template, one per real image.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from glm4v_bento.engine.errors import PromptError
from glm4v_bento.engine.parser import MARKERS as OUTPUT_MARKERS
from glm4v_bento.engine.parser import THINK_CLOSE, THINK_OPEN
from glm4v_bento.engine.types import GenerationRequest

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


@dataclass
class PreparedPrompt:
    input_ids: list[int]
    mm_token_type_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def request_images(request: GenerationRequest) -> list:
    """A request's images in prompt order: the earlier turns', then its own."""
    return [image for turn in request.history for image in turn.images] + list(request.images)


@dataclass
class _TextPiece:
    text: str
    allowed_markers: tuple[str, ...]  # marker strings that may stay tokens (assistant turns)


class PromptBuilder:
    def __init__(self, processor: Any, max_images: int, *, pin_memory: bool = False) -> None:
        """``pin_memory``: put pixel values in page-locked memory (for a CUDA model). The prefill
        then copies them to the GPU at full speed and without blocking, instead of through a
        staging buffer (9.8 ms of an H200's 108 ms prefill of a 1024x1024 image went to such
        copies). The pinning happens here, with the build: for large images, on the prompt
        thread (prompt_builds.py), not the scheduler's."""
        self.processor = processor
        self.pin_memory = pin_memory
        self.tokenizer = processor.tokenizer
        self.max_images = max_images
        self.image_token = processor.image_token
        self.video_token = processor.video_token
        # Longest first, so "</think>" is found before a shorter token that prefixes it.
        added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
        self._added_tokens = added
        self._added_ids = set(self.tokenizer.get_added_vocab().values())
        self._added_pattern = re.compile("|".join(re.escape(t) for t in added)) if added else None
        # Prompts are built on two threads (the scheduler's, and prompt_builds' for large images).
        # transformers sets on the shared tokenizer, at each call, whether special-token strings
        # count as special: encoding on both at once, one could get the other's setting.
        self._encoding = threading.Lock()

    def build(self, request: GenerationRequest) -> PreparedPrompt:
        images = request_images(request)
        if len(images) > self.max_images:
            raise PromptError(f"{len(images)} images in one request; the limit is {self.max_images}")
        if request.video is not None and images:
            raise PromptError("a request carries either images or one video, not both")
        if request.video is not None and not request.video.frames:
            raise PromptError("the video has no frames")

        messages, pieces = self._messages(request)
        rendered = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs = self._process_images(images)
        video_inputs = self._process_video(request)

        ids: list[int] = []
        expected = 0
        cursor = 0
        counters = {"image": 0, "video": 0}
        for match in _SENTINEL.finditer(rendered):
            index = int(match.group(1))
            if index != expected:
                raise PromptError("the chat template reordered or dropped message text")
            ids += self._encode_template(rendered[cursor : match.start()], image_inputs, video_inputs, counters)
            ids += self._encode_text(pieces[index])
            cursor, expected = match.end(), expected + 1
        if expected != len(pieces):
            raise PromptError("the chat template dropped message text")
        ids += self._encode_template(rendered[cursor:], image_inputs, video_inputs, counters)

        if counters["image"] != len(images) or counters["video"] != (request.video is not None):
            raise PromptError("the chat template did not place every image")
        return PreparedPrompt(
            input_ids=ids,
            mm_token_type_ids=self.processor.create_mm_token_type_ids([ids])[0],
            pixel_values=self._pinned(image_inputs["pixel_values"]) if image_inputs else None,
            image_grid_thw=image_inputs["image_grid_thw"] if image_inputs else None,
            pixel_values_videos=self._pinned(video_inputs["pixel_values_videos"]) if video_inputs else None,
            video_grid_thw=video_inputs["video_grid_thw"] if video_inputs else None,
        )

    def _pinned(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.pin_memory() if self.pin_memory else pixels

    # --- messages with sentinels in place of client text

    def _messages(self, request: GenerationRequest) -> tuple[list[dict], list[_TextPiece]]:
        pieces: list[_TextPiece] = []

        def sentinel(text: str, allowed: tuple[str, ...] = ()) -> str:
            pieces.append(_TextPiece(text, allowed))
            return f"\ue000{len(pieces) - 1}\ue001"

        messages: list[dict] = []
        if request.system:
            messages.append({"role": "system", "content": sentinel(request.system)})
        for turn in request.history:
            if turn.role == "assistant":
                answer = _strip_thinking(turn.text)
                messages.append({"role": "assistant", "content": sentinel(answer, OUTPUT_MARKERS)})
            else:
                messages.append({"role": "user", "content": self._user_content(turn.images, turn.text, sentinel)})
        content = self._user_content(request.images, request.prompt, sentinel)
        if request.video is not None:
            content.insert(0, {"type": "video"})
        messages.append({"role": "user", "content": content})
        return messages, pieces

    @staticmethod
    def _user_content(images: list, text: str, sentinel) -> list[dict]:
        content: list[dict] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": sentinel(text)})
        return content

    # --- tokenization

    def _encode_template(self, text: str, image_inputs, video_inputs, counters: dict[str, int]) -> list[int]:
        """Template text: special tokens allowed; image/video placeholders expanded."""
        if not text:
            return []
        out: list[str] = []
        for chunk in re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", text):
            if chunk == self.image_token:
                if image_inputs is None or counters["image"] >= len(image_inputs["image_grid_thw"]):
                    raise PromptError("the chat template placed more images than the request has")
                out.append(self.processor.replace_image_token(image_inputs, counters["image"]))
                counters["image"] += 1
            elif chunk == self.video_token:
                if video_inputs is None or counters["video"] >= 1:
                    raise PromptError("the chat template placed more videos than the request has")
                out.append(self.processor.replace_video_token(video_inputs, 0))
                counters["video"] += 1
            else:
                out.append(chunk)
        with self._encoding:
            return self.tokenizer.encode("".join(out), add_special_tokens=False)

    def _encode_text(self, piece: _TextPiece) -> list[int]:
        """Client text: any special-token string in it is spelled out as ordinary text."""
        ids: list[int] = []
        cursor = 0
        text = piece.text
        matches = self._added_pattern.finditer(text) if self._added_pattern else ()
        for match in matches:
            ids += self._encode_plain(text[cursor : match.start()])
            token = match.group(0)
            if token in piece.allowed_markers:
                ids.append(self.tokenizer.convert_tokens_to_ids(token))
            else:
                # Split the token string so the tokenizer cannot match it as a whole.
                ids += self._encode_plain(token[:1]) + self._encode_plain(token[1:])
            cursor = match.end()
        ids += self._encode_plain(text[cursor:])
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        with self._encoding:
            ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        if self._added_ids.intersection(ids):
            raise PromptError("text could not be tokenized without special tokens")
        return ids

    # --- vision inputs

    def _process_images(self, images: list) -> dict | None:
        if not images:
            return None
        return self.processor.image_processor(images=images, return_tensors="pt")

    def _process_video(self, request: GenerationRequest) -> dict | None:
        if request.video is None:
            return None
        from transformers.video_utils import VideoMetadata

        video = request.video
        metadata = VideoMetadata(
            total_num_frames=len(video.frames),
            fps=video.fps,
            duration=len(video.frames) / video.fps,
            frames_indices=list(range(len(video.frames))),
        )
        return self.processor.video_processor(
            videos=[video.frames], video_metadata=[metadata], return_metadata=True, return_tensors="pt"
        )


def _strip_thinking(text: str) -> str:
    """Earlier answers go back without their thinking, as the model's own scripts do."""
    _, sep, after = text.rpartition(THINK_CLOSE)
    if sep:
        return after.strip()
    return "" if THINK_OPEN in text else text  # thinking cut off before any answer
