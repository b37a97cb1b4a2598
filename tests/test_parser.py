"""The output parser: whole texts, cut-off texts, and the same texts streamed in pieces."""

from __future__ import annotations

import random

import pytest

from glm4v_bento.engine.parser import OutputParser, parse_output

CASES = {
    "complete": (
        "<think>The image shows a house.</think><answer>A red house.</answer>",
        ("The image shows a house.", "A red house.", None),
    ),
    "whitespace_around_parts": (
        "<think>\n  step one\n step two \n</think>\n<answer>\n final \n</answer>\n",
        ("step one\n step two", "final", None),
    ),
    "box": (
        "<think>count them</think><answer>There are <|begin_of_box|>42<|end_of_box|> cats.</answer>",
        ("count them", "There are 42 cats.", "42"),
    ),
    "thinking_cut_by_max_tokens": (
        "<think>Let me look at the top left corner, and then",
        ("Let me look at the top left corner, and then", "", None),
    ),
    "answer_cut_by_max_tokens": (
        "<think>ok</think><answer>The answer is <|begin_of_box|>4",
        ("ok", "The answer is 4", "4"),
    ),
    "no_answer_tags": (
        "<think>hmm</think>\nJust a plain answer.",
        ("hmm", "Just a plain answer.", None),
    ),
    "no_tags_at_all": ("A plain reply.", ("", "A plain reply.", None)),
    "stray_think_close_is_dropped": (
        "plain</think><answer>yes</answer>",
        ("", "plainyes", None),
    ),
    "text_before_think": ("\n<think>a</think><answer>b</answer>", ("a", "b", None)),
    "less_than_signs_are_text": (
        "<think>is 3 < 4? and <b>bold</b></think><answer>a<b</answer>",
        ("is 3 < 4? and <b>bold</b>", "a<b", None),
    ),
    "text_after_answer_is_dropped": ("<answer>yes</answer><|user|>", ("", "yes", None)),
    "empty": ("", ("", "", None)),
}


@pytest.mark.parametrize("name", CASES)
def test_whole_text(name):
    text, (thinking, answer, box) = CASES[name]
    parsed = parse_output(text)
    assert (parsed.thinking, parsed.answer, parsed.box) == (thinking, answer, box)


def _stream(text: str, sizes) -> tuple[str, str, list]:
    parser = OutputParser()
    deltas = []
    position = 0
    for size in sizes:
        if position >= len(text):
            break
        deltas += parser.feed(text[position : position + size])
        position += size
    deltas += parser.feed(text[position:])
    deltas += parser.finish()
    thinking = "".join(d.text for d in deltas if d.part == "thinking")
    answer = "".join(d.text for d in deltas if d.part == "answer")
    return thinking, answer, deltas


@pytest.mark.parametrize("name", CASES)
def test_streamed_one_character_at_a_time_matches_whole_text(name):
    text, (thinking, answer, _) = CASES[name]
    assert _stream(text, [1] * len(text))[:2] == (thinking, answer)


@pytest.mark.parametrize("seed", range(20))
def test_streamed_in_random_pieces_matches_whole_text(seed):
    rng = random.Random(seed)
    text, _ = CASES[rng.choice(list(CASES))]
    sizes = [rng.randint(1, 9) for _ in range(len(text))]
    parsed = parse_output(text)
    assert _stream(text, sizes)[:2] == (parsed.thinking, parsed.answer)


def test_thinking_deltas_come_before_answer_deltas():
    text = "<think>a b c</think><answer>d e</answer>"
    _, _, deltas = _stream(text, [2] * len(text))
    parts = [d.part for d in deltas]
    assert parts == sorted(parts, key=lambda p: p != "thinking")
    assert all(d.text for d in deltas)


def test_a_marker_split_across_pieces_never_leaks():
    text = "<think>x</think><answer>y</answer>"
    for cut in range(1, len(text)):
        _, _, deltas = _stream(text, [cut, len(text)])
        assert all("<" not in d.text and ">" not in d.text for d in deltas), cut


def test_a_prompt_that_opened_thinking():
    text = "reasoning here</think><answer>yes</answer>"
    parsed = parse_output(text, thinking_opened=True)
    assert (parsed.thinking, parsed.answer) == ("reasoning here", "yes")
    parser = OutputParser(thinking_opened=True)
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert "".join(d.text for d in deltas if d.part == "thinking") == "reasoning here"


def test_untagged_text_streams_out_as_it_comes():
    parser = OutputParser()
    assert [d.text for d in parser.feed("Hello ")] == ["Hello"]  # a trailing space waits for more text
    assert [d.text for d in parser.feed("wor")] == [" wor"]
    assert [d.text for d in parser.feed("ld <thi")] == ["ld"]  # "<thi" may still become "<think>"
    assert [d.text for d in parser.feed("s is text")] == [" <this is text"]
