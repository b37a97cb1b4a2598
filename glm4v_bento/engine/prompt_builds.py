"""Prompts with large images built on a thread of their own, ahead of admission.

Building a prompt resizes, normalises and cuts its images into patches: on a CPU, about 115 ms
for one 12-megapixel photo and 430 ms for four (docs/benchmarks.md, "Large images arriving
while streams run"). Built on the scheduler thread, that time was a pause in every running
stream. Requests with at least ``HEAVY_PIXELS`` of input images are built here as they come near
the head of the queue; the scheduler admits them once built and keeps decoding meanwhile.

Smaller requests are still built on the scheduler thread as they are admitted. For them the
handoff costs more than the build (2 ms or less): with every prompt handed off, the 64-client load
test (48x48 images) was answered 24-27% less often, in smaller admission groups and with the two
threads contending for Python's lock.

One worker: prompts are then ready in the order the requests came, and no more of them are held
in memory (their pixel values) than the scheduler asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from glm4v_bento.engine.prompt import PreparedPrompt, request_images
from glm4v_bento.engine.types import GenerationRequest

# About 500x500 pixels: GLM-4.1V's processor takes about 2 ms for that on a CPU core, 8 ms for
# 1024x1024.
HEAVY_PIXELS = 250_000


def input_pixels(request: GenerationRequest) -> int:
    """Pixels of all the images (and video frames) a request brings, before any resizing."""
    images = request_images(request)
    if request.video is not None:
        images += request.video.frames
    return sum(image.width * image.height for image in images)


def is_heavy(request: GenerationRequest) -> bool:
    """Whether the request's prompt is built on the worker rather than the scheduler thread."""
    return input_pixels(request) >= HEAVY_PIXELS


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
