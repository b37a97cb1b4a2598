"""The scheduler: one thread owns the model and decides, step by step, which rows run.

Continuous mode: between two decode steps, waiting requests are admitted (their prefill
runs, images included, and their KV cache joins the running batch); finished or
cancelled rows leave at once. A long prompt's prefill runs a chunk per step, between the
running batch's decode steps, so the batch keeps streaming meanwhile; one admitted group
prefills at a time. Static mode admits only into an empty batch, so a batch
runs until its longest row ends (the classic batcher, kept for comparison).

Admission is first come, first served, within three bounds: rows running at once, the
KV-cache room (rows x the longest row's prompt + max_new_tokens: the cache is a rectangle), and a bounded
wait queue that refuses new work at once when full. Prompts (images resized and cut into patches,
text tokenized) with large images are built on a thread of their own as they near the head of
the queue (prompt_builds.py): while rows run, such a request is admitted once its prompt is
ready, and meanwhile the requests behind it can go first; into an idle batch, the next group
is admitted together once its prompts are all built. Other prompts are built here, at admission.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

import torch

from glm4v_bento.engine.errors import EngineClosedError, PromptError, QueueFullError
from glm4v_bento.engine.handle import RequestHandle
from glm4v_bento.engine.overlap import PendingTokens
from glm4v_bento.engine.prompt import PreparedPrompt, PromptBuilder
from glm4v_bento.engine.prompt_builds import PromptBuilds, is_heavy
from glm4v_bento.engine.runner import ModelRunner, Prefilled, PrefillJob
from glm4v_bento.engine.sampling import next_token_tensor, sample_next_tokens, token_logprobs
from glm4v_bento.engine.sequence import Sequence
from glm4v_bento.engine.types import (
    MAX_LOGPROBS,
    ErrorType,
    GenerationRequest,
    GenerationResult,
    SamplingDefaults,
    Timings,
    Usage,
)

logger = logging.getLogger(__name__)


_SHUTDOWN_NOTE = "the server shut down before this request finished"


# Large-image prompts built beyond the rows free now: ready for the next rows that free up.
PROMPTS_AHEAD = 2


@dataclass(frozen=True)
class SchedulerLimits:
    max_running: int = 32
    max_batch_tokens: int = 294_912
    max_waiting: int = 256
    policy: Literal["continuous", "static"] = "continuous"


@dataclass
class _Prefilling:
    """An admitted group whose prefill is under way, a chunk per step."""

    rows: list[tuple[Sequence, RequestHandle]]
    job: PrefillJob


@dataclass
class _Waiting:
    handle: RequestHandle
    submitted_at: float
    heavy: bool = False  # its prompt is built on the prompt thread (large images)
    prompt: Future[PreparedPrompt] | None = None  # that build, started when it nears the head
    sequence: Sequence | None = None  # made once, when first considered for admission


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        prompts: PromptBuilder,
        limits: SchedulerLimits,
        *,
        default_max_new_tokens: int,
        sampling_defaults: SamplingDefaults | None = None,
        overlap_steps: bool = False,
    ) -> None:
        self.runner = runner
        # Launch each decode step before reading back the tokens of the one before (overlap.py).
        self.overlap_steps = overlap_steps
        self._pending: PendingTokens | None = None
        self._staging: torch.Tensor | None = None  # pinned, for the tokens' way back from a GPU
        self.prompts = prompts
        self.limits = limits
        self.default_max_new_tokens = default_max_new_tokens
        self.sampling_defaults = sampling_defaults or SamplingDefaults()
        self._waiting: deque[_Waiting] = deque()
        self._running: list[tuple[Sequence, RequestHandle]] = []
        self._prefilling: _Prefilling | None = None
        self._by_id: dict[str, RequestHandle] = {}
        self._cond = threading.Condition()
        self._prompt_builds = PromptBuilds(prompts.build, on_ready=self._wake)
        self._closed = False
        self._draining = False
        # Why the loop stopped when nobody closed it (a bug): the engine can no longer serve.
        self.failure: str | None = None
        # Told after every step: (rows running, requests waiting). For metrics; must be quick.
        self.on_step: Callable[[int, int], None] | None = None
        self._told_step_failure = False
        self._thread = threading.Thread(target=self._loop, name="glm4v-scheduler", daemon=True)
        self._thread.start()

    # --- caller side (any thread)

    def submit(self, request: GenerationRequest, *, stream: bool = False) -> RequestHandle:
        [outcome] = self.submit_many([request], stream=stream)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_many(
        self, requests: list[GenerationRequest], *, stream: bool = False
    ) -> list[RequestHandle | QueueFullError]:
        """Queue several requests at once, so they can start in the same step.
        Each gets a handle, or a QueueFullError if the wait queue had no room left for it."""
        outcomes: list[RequestHandle | QueueFullError] = []
        with self._cond:
            if self.failure is not None:
                raise EngineClosedError("the engine stopped after an internal error; the server needs a restart")
            if self._closed or self._draining:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            now = time.perf_counter()
            for request in requests:
                if len(self._waiting) >= self.limits.max_waiting:
                    waiting = len(self._waiting)
                    outcomes.append(
                        QueueFullError(f"{waiting} requests are already waiting (the limit); retry shortly")
                    )
                    continue
                handle = RequestHandle(request, stream=stream, on_cancel=self._wake)
                self._waiting.append(_Waiting(handle, now, heavy=is_heavy(request)))
                if request.request_id:
                    self._by_id[request.request_id] = handle
                outcomes.append(handle)
            self._build_ahead(self._rows_free())
            self._cond.notify()
        return outcomes

    def cancel(self, request_id: str) -> bool:
        handle = self._by_id.get(request_id)
        if handle is None:
            return False
        handle.cancel()
        return True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def drain(self, grace_s: float) -> None:
        """Graceful stop: refuse new requests, give the admitted ones ``grace_s`` seconds to
        finish, then end the rest (finish_reason "cancelled", with a note that says why)."""
        with self._cond:
            self._draining = True
        deadline = time.monotonic() + grace_s
        while (self._running or self._waiting or self._prefilling) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.close()

    def close(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        self._prompt_builds.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the loop (scheduler thread)

    def _loop(self) -> None:
        try:
            while (admitted := self._admit()) is not None:
                if admitted:
                    self._begin_prefill(admitted)
                if self._prefilling is not None:
                    self._continue_prefill(self._prefilling)
                self._drop_cancelled()
                if self._running:
                    self._step()
                if self.on_step is not None:
                    self._tell_step()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.exception("the scheduler stopped unexpectedly")
            raise
        finally:
            with self._cond:  # no one may queue behind a loop that is gone
                self._closed = True
            self._fail_everything("cancelled", None)

    def _tell_step(self) -> None:
        """A failing observer (metrics) must not stop the serving: said once, then ignored."""
        try:
            self.on_step(len(self._running), len(self._waiting))
        except Exception:
            if not self._told_step_failure:
                self._told_step_failure = True
                logger.exception("the step callback failed (metrics may be off); serving goes on")

    def _admit(self) -> list[tuple[Sequence, RequestHandle]] | None:
        """The requests to start now ([] to just keep decoding); None when shutting down."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._drop_cancelled_waiting()
                if self._prefilling is not None:  # it goes on first; the queue waits for it
                    return []
                room = self._rows_free()
                self._build_ahead(room)
                if self._waiting and room > 0 and not self._running:
                    # Nothing runs, so nothing is held up: the group waits for all its prompts
                    # (built back to back) and starts together.
                    candidates = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                    break
                if self._waiting and room > 0 and (candidates := self._take_ready(room)):
                    break
                if self._running:
                    return []
                self._cond.wait()

        admitted: list[tuple[Sequence, RequestHandle]] = []
        # The KV cache is a rectangle: every row gets as many columns as the longest row can need.
        rows = len(self._running)
        longest = max((seq.reserved_tokens for seq, _ in self._running), default=0)
        for position, entry in enumerate(candidates):
            if entry.sequence is None:
                try:
                    entry.sequence = self._build(entry)
                except (PromptError, ValueError) as exc:
                    self._finish_early(entry, str(exc), "invalid_request")
                    continue
                except Exception as exc:  # a bug, not the client's doing: this request fails alone
                    logger.exception("the prompt of a request could not be built")
                    self._finish_early(entry, f"the request could not be prepared ({type(exc).__name__})", "internal")
                    continue
            fits = (rows + 1) * max(longest, entry.sequence.reserved_tokens) <= self.limits.max_batch_tokens
            if not fits and (self._running or admitted):
                with self._cond:  # no room yet: back to the head of the queue, order kept
                    self._waiting.extendleft(reversed(candidates[position:]))
                break
            rows += 1
            longest = max(longest, entry.sequence.reserved_tokens)
            admitted.append((entry.sequence, entry.handle))
        return admitted

    def _rows_free(self) -> int:
        if self.limits.policy == "static" and self._running:
            return 0
        return self.limits.max_running - len(self._running)

    def _build_ahead(self, room: int) -> None:
        """Start building the large-image prompts of the requests that can be admitted next: as
        many as there are free rows, and a few more, ready for when rows free up (the lock is
        held)."""
        for entry in itertools.islice(self._waiting, max(room, 0) + PROMPTS_AHEAD):
            if entry.heavy and entry.prompt is None:
                entry.prompt = self._prompt_builds.start(entry.handle.request)

    def _take_ready(self, room: int) -> list[_Waiting]:
        """Up to ``room`` waiting requests that can be admitted now (their prompts are built, or
        are built at admission), taken from the queue in order; those passed over keep their
        places (the lock is held)."""
        ready: list[_Waiting] = []
        passed: list[_Waiting] = []
        while self._waiting and len(ready) < room:
            entry = self._waiting.popleft()
            built = not entry.heavy or (entry.prompt is not None and entry.prompt.done())
            (ready if built else passed).append(entry)
        self._waiting.extendleft(reversed(passed))
        return ready

    def _build(self, entry: _Waiting) -> Sequence:
        request = entry.handle.request
        if not entry.heavy:
            prompt = self.prompts.build(request)
        else:
            if entry.prompt is None:  # normally started ahead (_build_ahead)
                entry.prompt = self._prompt_builds.start(request)
            prompt = entry.prompt.result()
        max_context = self.runner.loaded.max_context
        budget = max_context - prompt.num_tokens
        asked = request.params.max_new_tokens
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise PromptError(
                f"logprobs asks for {request.logprobs} alternatives per token; 0 to {MAX_LOGPROBS} can be"
            )
        if budget < 1:
            raise PromptError(
                f"the prompt is {prompt.num_tokens} tokens, which fills the model's context of {max_context} tokens"
            )
        if asked is not None and asked > budget:
            raise PromptError(
                # Worded without a field name: each API names the length its own way (max_tokens...).
                f"the prompt is {prompt.num_tokens} tokens and {asked} new tokens were asked for: together they "
                f"exceed the model's context of {max_context} tokens (at most {budget} new tokens fit)"
            )
        loaded = self.runner.loaded
        return Sequence(
            request,
            prompt,
            max_new_tokens=asked if asked is not None else min(self.default_max_new_tokens, budget),
            tokenizer=loaded.tokenizer,
            eos_token_ids=loaded.eos_token_ids,
            device=loaded.device,
            submitted_at=entry.submitted_at,
            sampling_defaults=self.sampling_defaults,
        )

    def _begin_prefill(self, admitted: list[tuple[Sequence, RequestHandle]]) -> None:
        """Embed the new rows' prompts (images included); their prefill runs a chunk per step."""
        started = time.perf_counter()
        for seq, _ in admitted:
            seq.started_at = started
        try:
            self._prefilling = _Prefilling(admitted, self.runner.begin_prefill([seq.prompt for seq, _ in admitted]))
        except Exception as error:
            self._prefill_failed(admitted, error)

    def _continue_prefill(self, group: _Prefilling) -> None:
        """The group's next chunk; after the last, the rows join the running batch."""
        if all(handle.cancelled for _, handle in group.rows):  # nobody waits for the rest
            self._prefilling = None
            for seq, handle in group.rows:
                seq.cancel()
                self._deliver(seq, handle)
            return
        try:
            done = self.runner.prefill_step(group.job)
            if done is None:
                return
            self._prefilling = None
            self._join(group.rows, *done)
        except Exception as error:
            self._prefilling = None
            self._prefill_failed(group.rows, error)
            return
        self._running.extend(group.rows)
        self._prune()

    def _start_now(self, admitted: list[tuple[Sequence, RequestHandle]]) -> None:
        """Prefill the new rows to the end at once and join them (a failed group's retries)."""
        self._begin_prefill(admitted)
        while self._prefilling is not None:
            self._continue_prefill(self._prefilling)

    def _join(self, admitted: list[tuple[Sequence, RequestHandle]], prefilled: Prefilled, logits) -> None:
        """Join the running batch's cache, then sample the first tokens (the caller then adds
        the rows to the running batch: a failure here leaves them out of it)."""
        self.runner.join(prefilled)
        done = time.perf_counter()
        for seq, _ in admitted:
            seq.prefill_done_at = done
        self._sample(admitted, logits)

    def _prefill_failed(self, admitted: list[tuple[Sequence, RequestHandle]], error: Exception) -> None:
        logger.exception("prefill of %d new requests failed", len(admitted), exc_info=error)
        if not self._keep_rows(list(range(len(self._running)))):  # drop them from the cache if they got in
            self._finish_failed(admitted, error)
            return
        if len(admitted) == 1:
            self._finish_failed(admitted, error)
            return
        for one in admitted:  # find the request that breaks it; the others still run
            self._start_now([one])

    def _step(self) -> None:
        rows = list(self._running)
        pending, self._pending = self._pending, None
        try:
            logits = self.runner.decode(pending.feed(rows) if pending else [seq.output_ids[-1] for seq, _ in rows])
        except Exception as exc:
            logger.exception("a decode step of %d rows failed", len(rows))
            self._fail_everything("error", exc)
            return
        if pending is not None:  # the step before's tokens, read back while this one runs
            self._take(pending.rows, pending.wait())
        if self.overlap_steps and not any(seq.request.logprobs is not None for seq, _ in rows):
            tokens = next_token_tensor(logits, [seq for seq, _ in rows])
            self._pending = PendingTokens(rows, tokens, self._staging_for(tokens))
        else:
            self._sample(rows, logits)
        self._prune()

    def _staging_for(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if tokens.device.type != "cuda":
            return None
        if self._staging is None or len(self._staging) < len(tokens):
            self._staging = torch.empty(max(len(tokens), self.limits.max_running), dtype=tokens.dtype, pin_memory=True)
        return self._staging

    def _sample(self, rows: list[tuple[Sequence, RequestHandle]], logits) -> None:
        sequences = [seq for seq, _ in rows]
        tokens = sample_next_tokens(logits, sequences)
        logprobs = token_logprobs(logits, sequences, tokens)
        for (seq, _), token, found in zip(rows, tokens, logprobs, strict=True):
            if found is not None and not seq.finished:
                seq.add_logprobs(token, *found)
        self._take(rows, tokens)

    def _take(self, rows: list[tuple[Sequence, RequestHandle]], tokens: list[int]) -> None:
        """Each row's next token. A row that finished meanwhile (its token came from a step it
        only rode along on, or it was cancelled) takes none."""
        for (seq, handle), token in zip(rows, tokens, strict=True):
            if seq.finished:
                continue
            seq.append(token)
            handle.emit(seq.take_delta(), seq.take_logprobs())

    def _drop_cancelled(self) -> None:
        cancelled = [seq for seq, handle in self._running if handle.cancelled and not seq.finished]
        for seq in cancelled:
            seq.cancel()
        if cancelled:
            self._prune()

    def _prune(self) -> None:
        """Finished rows leave the batch at once and their callers get their results."""
        keep = [row for row, (seq, _) in enumerate(self._running) if not seq.finished]
        if len(keep) == len(self._running):
            return
        if not keep:  # tokens still on their way can only be those of finished rows
            self._pending = None
        for seq, handle in self._running:
            if seq.finished:
                self._deliver(seq, handle)
        self._running = [self._running[row] for row in keep]
        self._keep_rows(keep)

    def _keep_rows(self, rows: list[int]) -> bool:
        """Compact the cache to ``rows``; if that fails (out of GPU memory...), the running rows
        cannot go on: they end with an error, and the loop carries on with the next requests."""
        try:
            self.runner.keep(rows)
        except Exception as exc:
            logger.exception("compacting the running batch failed")
            self._fail_everything("error", exc)
            return False
        return True

    def _deliver(self, seq: Sequence, handle: RequestHandle) -> None:
        handle.emit(seq.take_delta(), seq.take_logprobs())
        handle.finish(seq.result())
        self._forget(handle)

    def _drop_cancelled_waiting(self) -> None:
        if any(entry.handle.cancelled for entry in self._waiting):
            for entry in [e for e in self._waiting if e.handle.cancelled]:
                self._waiting.remove(entry)
                self._finish_early(entry, None, None)

    def _finish_early(self, entry: _Waiting, error: str | None, error_type: ErrorType | None) -> None:
        """A request that never ran: refused (error) or cancelled (while waiting, or at shutdown)."""
        if entry.prompt is not None:
            entry.prompt.cancel()  # if its build has not started, it never will (no-op once built)
        elapsed = time.perf_counter() - entry.submitted_at
        entry.handle.finish(
            GenerationResult(
                request_id=entry.handle.request_id,
                text="",
                thinking="",
                answer="",
                finish_reason="error" if error else "cancelled",
                error=error or (_SHUTDOWN_NOTE if self._closed else None),
                error_type=error_type,
                usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                timings=Timings(queue_s=elapsed, prefill_s=0.0, decode_s=0.0, total_s=elapsed),
            )
        )
        self._forget(entry.handle)

    def _finish_failed(self, rows: list[tuple[Sequence, RequestHandle]], error: BaseException) -> None:
        for seq, handle in rows:
            message = f"generation failed on the server ({type(error).__name__})"
            handle.finish(
                seq.result().model_copy(update={"finish_reason": "error", "error": message, "error_type": "internal"})
            )
            self._forget(handle)

    def _fail_everything(self, reason: Literal["cancelled", "error"], error: BaseException | None) -> None:
        """End every running row (a failed step, or shutdown) and, on shutdown, every waiting one."""
        running, self._running = self._running, []
        self._pending = None
        self.runner.clear()
        if reason == "cancelled" and self._prefilling is not None:  # shutdown: theirs ends too
            running += self._prefilling.rows
            self._prefilling = None
        if reason == "error":
            self._finish_failed(running, error or RuntimeError())
            return
        for seq, handle in running:
            seq.cancel()
            handle.emit(seq.take_delta())
            handle.finish(seq.result().model_copy(update={"error": _SHUTDOWN_NOTE}))
            self._forget(handle)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for entry in waiting:
            self._finish_early(entry, None, None)

    def _forget(self, handle: RequestHandle) -> None:
        with self._cond:
            if handle.request_id and self._by_id.get(handle.request_id) is handle:
                del self._by_id[handle.request_id]
