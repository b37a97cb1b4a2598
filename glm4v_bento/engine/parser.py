"""Split GLM-4.1V-Thinking output into thinking, answer and box content.

The model writes ``<think>...</think><answer>...</answer>``; the answer may hold one
``<|begin_of_box|>...<|end_of_box|>``. One state machine serves both the whole text
(``parse_output``) and a token stream (``OutputParser.feed``), so streamed pieces always
concatenate to the non-streamed result.

Tolerated: a missing ``</think>`` (cut by max_new_tokens: all of it is thinking), no
``<answer>`` tags (text after ``</think>`` is the answer), no tags at all (all answer).
GLM-4.1V's prompt leaves ``<think>`` to the model; for a prompt that opens it itself, pass
``thinking_opened=True`` and the text up to ``</think>`` is thinking. Text streams out as it
comes, held back only while it could still be the start of a marker. Leading and trailing
whitespace of each part is dropped; markers never reach a part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
MARKERS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, BOX_OPEN, BOX_CLOSE)

Part = Literal["thinking", "answer"]


@dataclass(frozen=True)
class Delta:
    part: Part
    text: str


@dataclass(frozen=True)
class ParsedOutput:
    thinking: str
    answer: str
    box: str | None


class OutputParser:
    """Incremental parser: ``feed`` text pieces, then ``finish``; both return ``Delta``s."""

    def __init__(self, thinking_opened: bool = False) -> None:
        self._pending = ""  # text that may still turn out to be a marker
        # start: before any marker (answer text unless <think> comes); between: after </think>
        self._state: Literal["start", "think", "between", "answer", "done"] = "think" if thinking_opened else "start"
        self._section_started = False  # a part's leading whitespace is dropped
        self._held_space = ""  # trailing whitespace, released only if more text follows
        self._in_box = False
        self._box: list[str] | None = None
        self.thinking = ""
        self.answer = ""

    @property
    def box(self) -> str | None:
        return None if self._box is None else "".join(self._box).strip()

    def feed(self, text: str) -> list[Delta]:
        self._pending += text
        out: list[Delta] = []
        while self._pending:
            index = self._pending.find("<")
            if index == -1:
                self._emit(self._pending, out)
                self._pending = ""
                break
            if index > 0:
                self._emit(self._pending[:index], out)
                self._pending = self._pending[index:]
            marker = next((m for m in MARKERS if self._pending.startswith(m)), None)
            if marker is not None:
                self._pending = self._pending[len(marker) :]
                self._on_marker(marker)
            elif any(m.startswith(self._pending) for m in MARKERS):
                break  # could still become a marker: wait for more text
            else:
                self._emit("<", out)
                self._pending = self._pending[1:]
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        if self._pending:
            self._emit(self._pending, out)
            self._pending = ""
        return out

    def result(self) -> ParsedOutput:
        return ParsedOutput(self.thinking, self.answer, self.box)

    # --- state machine

    def _on_marker(self, marker: str) -> None:
        state = self._state
        if marker == THINK_OPEN and state == "start" and not self.answer:
            self._enter("think")
        elif marker == THINK_CLOSE and state in ("start", "think"):
            self._enter("between")
        elif marker == ANSWER_OPEN and state in ("start", "think", "between"):
            self._enter("answer")
        elif marker == ANSWER_CLOSE and state in ("start", "between", "answer"):
            self._in_box = False
            self._enter("done")
        elif marker == BOX_OPEN and self._part() == "answer" and self._box is None:
            self._in_box, self._box = True, []
        elif marker == BOX_CLOSE and self._in_box:
            self._in_box = False
        # Any other marker is out of place (random or malformed output): dropped.

    def _enter(self, state: Literal["think", "between", "answer", "done"]) -> None:
        entering_new_part = self._part_of(state) != self._part()
        self._state = state
        if entering_new_part:
            self._section_started, self._held_space = False, ""

    def _part(self) -> Part | None:
        return self._part_of(self._state)

    @staticmethod
    def _part_of(state: str) -> Part | None:
        if state == "think":
            return "thinking"
        if state in ("start", "between", "answer"):
            return "answer"
        return None

    def _emit(self, text: str, out: list[Delta]) -> None:
        part = self._part()
        if part is None or not text:
            return
        if self._in_box and self._box is not None:
            self._box.append(text)
        if not self._section_started:
            text = text.lstrip()
            if not text:
                return
            self._section_started = True
        body = text.rstrip()
        trailing = text[len(body) :]
        if body:
            piece = self._held_space + body
            self._held_space = trailing
            if part == "thinking":
                self.thinking += piece
            else:
                self.answer += piece
            if out and out[-1].part == part:
                out[-1] = Delta(part, out[-1].text + piece)
            else:
                out.append(Delta(part, piece))
        else:
            self._held_space += trailing


def parse_output(text: str, thinking_opened: bool = False) -> ParsedOutput:
    """Parse a whole generated text at once."""
    parser = OutputParser(thinking_opened)
    parser.feed(text)
    parser.finish()
    return parser.result()
