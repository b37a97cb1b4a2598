"""The engine's refusals, in a module of their own: the HTTP layer catches them without
importing torch (so `bentoml serve` and `bentoml build` read the service quickly)."""


class QueueFullError(RuntimeError):
    """The wait queue is full: try again shortly."""


class EngineClosedError(RuntimeError):
    """The engine was shut down and takes no more work."""


class PromptError(ValueError):
    """A request that cannot become a prompt (too long, too many images...)."""
