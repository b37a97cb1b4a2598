"""The model engine: importable and benchmarkable without BentoML or any HTTP stack.

Names load on first use (PEP 562): the HTTP layer's types and errors come without torch and
transformers, which only the worker that runs the model needs. `bentoml serve` and
`bentoml build` read the service in processes of their own, and start seconds sooner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module of this package that defines it
_WHERE = {
    "Engine": "engine",
    "EngineClosedError": "errors",
    "PromptError": "errors",
    "QueueFullError": "errors",
    "Finished": "handle",
    "RequestHandle": "handle",
    "StreamEvent": "handle",
    "TextDelta": "handle",
    "merged_events": "handle",
    "LoadedModel": "loader",
    "ModelLoadError": "loader",
    "load_model": "loader",
    "OutputParser": "parser",
    "ParsedOutput": "parser",
    "parse_output": "parser",
    "SchedulerLimits": "scheduler",
    "GenerationRequest": "types",
    "GenerationResult": "types",
    "SamplingDefaults": "types",
    "SamplingParams": "types",
    "Timings": "types",
    "TokenLogprob": "types",
    "TopLogprob": "types",
    "Turn": "types",
    "Usage": "types",
    "Video": "types",
}

__all__ = [
    "Engine",
    "EngineClosedError",
    "Finished",
    "GenerationRequest",
    "GenerationResult",
    "LoadedModel",
    "ModelLoadError",
    "OutputParser",
    "ParsedOutput",
    "PromptError",
    "QueueFullError",
    "RequestHandle",
    "SamplingDefaults",
    "SamplingParams",
    "SchedulerLimits",
    "StreamEvent",
    "TextDelta",
    "Timings",
    "TokenLogprob",
    "TopLogprob",
    "Turn",
    "Usage",
    "Video",
    "load_model",
    "merged_events",
    "parse_output",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from glm4v_bento.engine.engine import Engine
    from glm4v_bento.engine.errors import EngineClosedError, PromptError, QueueFullError
    from glm4v_bento.engine.handle import Finished, RequestHandle, StreamEvent, TextDelta, merged_events
    from glm4v_bento.engine.loader import LoadedModel, ModelLoadError, load_model
    from glm4v_bento.engine.parser import OutputParser, ParsedOutput, parse_output
    from glm4v_bento.engine.scheduler import SchedulerLimits
    from glm4v_bento.engine.types import (
        GenerationRequest,
        GenerationResult,
        SamplingDefaults,
        SamplingParams,
        Timings,
        TokenLogprob,
        TopLogprob,
        Turn,
        Usage,
        Video,
    )
