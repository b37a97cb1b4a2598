"""Resolve a model source, device and dtype, and load the processor and model.

The same code loads the real checkpoint (a Hugging Face id) and the tiny one (a local
directory): there is no special case for either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from glm4v_bento.engine.types import SamplingDefaults

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to check."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    model_id: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_context: int
    load_seconds: float
    # What unset sampling fields become: the checkpoint's generation_config (greedy without one).
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {device!r} was asked for, but this process sees {torch.cuda.device_count()} GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1} (CUDA_VISIBLE_DEVICES, if set, renumbers them from 0)"
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            # V100, T4: no native bfloat16 (PyTorch emulates it, slowly). float16 has the same size.
            logger.warning(
                "%s has no native bfloat16 (compute capability %d.%d): loading in float16. The model "
                "was trained in bfloat16; if answers come out empty or garbled (overflow), set dtype=float32.",
                torch.cuda.get_device_name(device),
                *torch.cuda.get_device_capability(device),
            )
            return torch.float16
        return torch.bfloat16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


def load_model(
    source: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load processor + model from a hub id or a local directory.

    ``device_map`` ("auto", "balanced"...) spreads the model over several devices, within
    ``max_memory`` per device, spilling to ``offload_folder`` on disk: for GPUs too small to
    hold it. Without it, the whole model goes to ``device``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    started = time.perf_counter()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    is_local = Path(source).is_dir()
    logger.info(
        "loading %s (%s) on %s as %s",
        source,
        "local directory" if is_local else "hub id",
        torch_device,
        torch_dtype,
    )
    try:
        processor = AutoProcessor.from_pretrained(source, revision=revision)
        model = AutoModelForImageTextToText.from_pretrained(
            source,
            revision=revision,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            device_map=device_map or str(torch_device),
            max_memory=_memory_map(max_memory) if device_map else None,
            offload_folder=offload_folder if device_map else None,
        )
    except (OSError, ValueError) as exc:
        hint = "" if is_local else " (is it a valid hub id, and is the hub reachable or the model cached?)"
        raise ModelLoadError(f"could not load model {source!r}{hint}: {exc}") from exc
    model.eval()
    if device_map:
        torch_device = _execution_device(model.hf_device_map)
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None) or processor.tokenizer.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    text_config = model.config.get_text_config()
    loaded = LoadedModel(
        model=model,
        processor=processor,
        model_id=source,
        revision=revision,
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=eos_ids,
        max_context=int(text_config.max_position_embeddings),
        load_seconds=time.perf_counter() - started,
        sampling_defaults=sampling_defaults(generation_config),
    )
    logger.info("loaded %s in %.1f s (%s parameters)", source, loaded.load_seconds, f"{loaded.parameter_count:,}")
    logger.info("sampling defaults from its generation_config: %s", loaded.sampling_defaults.model_dump())
    return loaded


def sampling_defaults(generation_config: Any) -> SamplingDefaults:
    """The sampling a checkpoint recommends, as ``model.generate()`` would apply it: sampled
    only where it sets ``do_sample``, with the values it gives; what it leaves out is neutral
    (temperature 1, no top-p, no top-k), not transformers' implicit top-k of 50. The repetition
    penalty applies to greedy decoding too."""
    given = {
        name: getattr(generation_config, name, None) for name in ("temperature", "top_p", "top_k", "repetition_penalty")
    }
    given = {name: value for name, value in given.items() if value is not None}
    try:
        if not getattr(generation_config, "do_sample", None):
            return SamplingDefaults(repetition_penalty=given.get("repetition_penalty", 1.0))
        return SamplingDefaults(**{"temperature": 1.0, **given})
    except ValidationError as exc:  # a value no request could ask for either (top_p=0...)
        logger.warning("ignoring the checkpoint's sampling settings %s (%s): decoding greedily", given, exc)
        return SamplingDefaults()


def _memory_map(max_memory: dict[str, str] | None) -> dict[int | str, str] | None:
    """{"0": "20GiB", "cpu": "64GiB"} -> {0: "20GiB", "cpu": "64GiB"} (GPU indices as ints)."""
    if not max_memory:
        return None
    return {int(key) if key.isdigit() else key: value for key, value in max_memory.items()}


def _execution_device(device_map: dict[str, int | str]) -> torch.device:
    """Where inputs go when the model is spread out: the first GPU it uses, else the CPU
    (offloaded layers are brought there to run; "disk" and "meta" are no place to compute)."""
    gpus = sorted(p for p in device_map.values() if isinstance(p, int))
    if gpus:
        return torch.device("cuda", gpus[0])
    named = [p for p in device_map.values() if isinstance(p, str) and p not in ("cpu", "disk", "meta")]
    return torch.device(named[0]) if named else torch.device("cpu")
