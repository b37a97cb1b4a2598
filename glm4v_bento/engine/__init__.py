"""The model engine: importable and benchmarkable without BentoML or any HTTP stack."""

from glm4v_bento.engine.engine import Engine
from glm4v_bento.engine.handle import Finished, RequestHandle, StreamEvent, TextDelta, merged_events
from glm4v_bento.engine.loader import LoadedModel, ModelLoadError, load_model
from glm4v_bento.engine.parser import OutputParser, ParsedOutput, parse_output
from glm4v_bento.engine.prompt import PromptError
from glm4v_bento.engine.scheduler import EngineClosedError, QueueFullError, SchedulerLimits
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
