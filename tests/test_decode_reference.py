"""The engine's own decode loop (static KV cache, the model's layers called directly) gives the
logits transformers' ``generate`` gives, row by row, however rows join and leave the batch."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

from glm4v_bento.engine import GenerationRequest, SamplingParams, Turn
from glm4v_bento.engine.runner import ModelRunner

STEPS = 12

REQUESTS = [
    GenerationRequest("Describe this image.", images=[make_image(64, 48)]),
    GenerationRequest("Text only, no picture at all in this longer prompt, which pads the others."),
    GenerationRequest(
        "And these two?",
        images=[make_image(112, 56), make_image(28, 84, (0, 90, 0))],
        history=[Turn("user", "first", images=[make_image(56, 56)]), Turn("assistant", "<answer>ok</answer>")],
    ),
]


class Reference:
    """One prompt's greedy tokens and per-step logits from transformers' generate loop
    (its DynamicCache, masks and positions)."""

    def __init__(self, loaded_model, prompt, steps: int = STEPS) -> None:
        inputs = {
            "input_ids": torch.tensor([prompt.input_ids]),
            "attention_mask": torch.ones(1, prompt.num_tokens, dtype=torch.long),
            "mm_token_type_ids": torch.tensor([prompt.mm_token_type_ids]),
        }
        if prompt.pixel_values is not None:
            inputs |= {"pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}
        self.vocab = len(loaded_model.tokenizer)  # the engine masks the checkpoint's padded ids
        padding_ids = list(range(self.vocab, loaded_model.model.config.text_config.vocab_size))
        with torch.inference_mode():
            output = loaded_model.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=steps,
                min_new_tokens=steps,
                suppress_tokens=padding_ids,
                output_logits=True,
                return_dict_in_generate=True,
            )
        self.tokens = output.sequences[0, prompt.num_tokens :].tolist()
        self.logits = [step[0, : self.vocab] for step in output.logits]

    def check(self, step: int, logits: torch.Tensor) -> None:
        assert torch.allclose(logits[: self.vocab], self.logits[step], atol=1e-4, rtol=1e-4), f"step {step}"


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.prompts.build(request) for request in REQUESTS]


@pytest.fixture(scope="module")
def references(loaded_model, prompts):
    return [Reference(loaded_model, prompt) for prompt in prompts]


def eager_replay(step, pool):
    """Stands in for CUDA-graph capture on the CPU: same fixed buffers, same bucketed shapes."""
    logits = step()

    def replay() -> None:
        logits.copy_(step())

    return replay, logits


@pytest.fixture(scope="module")
def compiled_runner(loaded_model):
    """One for the module: each new runner would be compiled again."""
    return ModelRunner(loaded_model, max_rows=8, compile_decode=True)


@pytest.fixture(params=["eager", "chunked prefill", "graphs", "compiled", "compiled+graphs"])
def runner(request, loaded_model, compiled_runner):
    if request.param.startswith("compiled"):
        runner = compiled_runner
        runner.graphs = None
    else:
        # Chunks of 7 columns cut through padding, image tokens and the prompts' ends.
        chunk = 7 if request.param == "chunked prefill" else None
        runner = ModelRunner(loaded_model, max_rows=8, prefill_chunk_tokens=chunk)
    if request.param.endswith("graphs"):
        runner.use_graphs(eager_replay)
    yield runner
    if runner.compiled is not None:  # it ran compiled, not quietly eager
        assert runner.compiled.enabled and runner.compiled.checked
    runner.keep([])


def decode_alone(runner, prompt, reference: Reference) -> None:
    """Prefill one prompt, feed it the reference's tokens, check every step's logits; then end the row."""
    prefilled, logits = runner.prefill([prompt])
    runner.join(prefilled)
    reference.check(0, logits[0])
    for step in range(1, STEPS):
        reference.check(step, runner.decode([reference.tokens[step - 1]])[0])
    runner.keep([])


def test_each_prompt_alone_matches_transformers(runner, prompts, references):
    for prompt, reference in zip(prompts, references, strict=True):
        decode_alone(runner, prompt, reference)


def test_rows_that_join_and_leave_at_different_times_match_transformers(runner, prompts, references):
    join_and_leave(runner, prompts, references)
    if runner.graphs is not None:
        assert runner.graphs.enabled and runner.graphs.captured >= 2


def test_steps_attend_over_a_multiple_of_16_columns_past_the_newest_masked(loaded_model, prompts, references):
    """On a GPU, SDPA checks whether the mask's rows are 8-aligned, and torch.compile compiled the
    one-row step again (5-17 s on an H200, mid-serving) when a step's columns first went from
    unaligned to aligned. So every step attends over a multiple of 16 columns, within the
    buffers, the columns past each row's newest one masked; logits stay transformers'."""
    runner = ModelRunner(loaded_model, max_rows=8)
    forward, seen = runner._forward, set()

    def checked(rows: int, columns: int) -> torch.Tensor:
        cache, newest = runner.cache, runner.cache.width
        assert columns % 16 == 0 and newest < columns <= cache.usable_columns
        assert cache.mask[:rows, 0, 0, newest].all() and not cache.mask[:rows, 0, 0, newest + 1 : columns].any()
        seen.add(newest + 1)
        return forward(rows, columns)

    runner._forward = checked  # the step as decode runs it without graphs
    join_and_leave(runner, prompts, references)
    assert any(newest % 16 for newest in seen) and len(seen) > 10  # rounded up often, over many widths


def join_and_leave(runner, prompts, references) -> None:
    """A short row runs; a longer one joins (the running row shifts right); two more join as a
    group; the first ones leave (the batch is compacted and its padding cut); the rest go on."""
    done = {}  # row's reference index -> steps taken

    def step(rows):
        logits = runner.decode([references[r].tokens[done[r] - 1] for r in rows])
        for row, r in enumerate(rows):
            references[r].check(done[r], logits[row])
            done[r] += 1

    def join(new):
        prefilled, logits = runner.prefill([prompts[r] for r in new])
        runner.join(prefilled)
        for row, r in enumerate(new):
            references[r].check(0, logits[row])
            done[r] = 1

    join([0])
    step([0])
    step([0])
    join([1])
    step([0, 1])
    join([2])
    step([0, 1, 2])
    runner.keep([1, 2])  # row 0 leaves
    assert runner.cache.width == max(runner.cache.lengths)
    step([1, 2])
    runner.keep([1])  # the first of them leaves, the second moves up
    assert runner.cache.width == max(runner.cache.lengths)  # no column is padding for every row
    while done[2] < STEPS:
        step([2])
    assert runner.rows == 1


def test_decoding_past_the_cache_capacity_grows_it_and_stays_exact(loaded_model, engine):
    """The cache starts at 512 columns; a row that outgrows it moves to larger buffers
    (captured graphs are dropped and captured again for the new buffers)."""
    steps = 530
    prompt = engine.prompts.build(GenerationRequest("A short prompt.", params=SamplingParams(max_new_tokens=steps)))
    reference = Reference(loaded_model, prompt, steps)
    runner = ModelRunner(loaded_model, max_rows=4)
    graphs = runner.use_graphs(eager_replay)
    prefilled, _ = runner.prefill([prompt])
    runner.join(prefilled)
    first_capacity = runner.cache.column_capacity
    for step in range(1, steps):
        reference.check(step, runner.decode([reference.tokens[step - 1]])[0])
    assert runner.cache.column_capacity > first_capacity
    assert graphs.enabled and graphs.captured >= 1


def test_a_capture_that_fails_turns_graphs_off_and_decoding_goes_on(loaded_model, prompts, references, caplog):
    runner = ModelRunner(loaded_model, max_rows=4)

    def broken_capture(step, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = runner.use_graphs(broken_capture)
    decode_alone(runner, prompts[0], references[0])
    assert not graphs.enabled and graphs.captured == 0
    assert "decoding eagerly" in caplog.text


def test_a_capture_that_disagrees_with_the_eager_step_is_not_used(loaded_model, prompts, references, caplog):
    runner = ModelRunner(loaded_model, max_rows=4)

    def wrong_capture(step, pool):
        logits = step()
        return (lambda: logits.mul_(-1.0)), logits  # replays give the wrong answer

    graphs = runner.use_graphs(wrong_capture)
    decode_alone(runner, prompts[0], references[0])
    assert not graphs.enabled and graphs.captured == 0
    assert "disagreed with the eager step" in caplog.text


@pytest.mark.parametrize("attention", ["eager"])
def test_decode_is_exact_whatever_attention_kernel_prefill_uses(tiny_model_dir, prompts, references, attention):
    from glm4v_bento.engine import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu", attn_implementation=attention)
    runner = ModelRunner(loaded, max_rows=4)
    prefilled, logits = runner.prefill(prompts[:2])
    runner.join(prefilled)
    for row in range(2):
        references[row].check(0, logits[row])
    for step in range(1, STEPS):
        logits = runner.decode([references[row].tokens[step - 1] for row in range(2)])
        for row in range(2):
            references[row].check(step, logits[row])
    assert loaded.model.config.text_config._attn_implementation == attention


def test_one_compilation_serves_every_batch_size_and_cache_length(loaded_model, engine, prompts, references, caplog):
    """Rows come and go and the cache outgrows its first buffers: the compiled step is not redone
    (on a GPU each compilation stalls decoding). One row and batches are compiled once each."""
    steps = 530
    long_prompt = engine.prompts.build(GenerationRequest("Go on.", params=SamplingParams(max_new_tokens=steps)))
    long_reference = Reference(loaded_model, long_prompt, steps)
    runner = ModelRunner(loaded_model, max_rows=8, compile_decode=True)
    prefilled, _ = runner.prefill([long_prompt])
    runner.join(prefilled)
    for step in range(1, steps):
        tokens = [long_reference.tokens[step - 1]]
        if step == 100:  # two more rows join for a while
            prefilled, _ = runner.prefill(prompts[:2])
            runner.join(prefilled)
        if 100 <= step < 100 + STEPS - 1:
            tokens += [references[row].tokens[step - 100] for row in range(2)]
        if step == 100 + STEPS - 1:
            runner.keep([0])
        logits = runner.decode(tokens)
        long_reference.check(step, logits[0])
    assert runner.cache.row_capacity >= 3 and runner.cache.column_capacity > 530
    assert runner.compiled.enabled and runner.compiled.compilations == 2  # one row, then batches
    assert "compiled again" not in caplog.text


@pytest.mark.parametrize("failure", ["raises", "wrong", "wrong after a recompilation"])
def test_a_compiled_step_that_fails_or_disagrees_is_turned_off(loaded_model, prompts, references, caplog, failure):
    from torch._dynamo.utils import counters

    runner = ModelRunner(loaded_model, max_rows=4, compile_decode=True)
    calls = []

    def broken(rows, columns):
        calls.append(rows)
        if failure == "raises":
            raise RuntimeError("triton: no C compiler (simulated)")
        if failure == "wrong":
            return -runner._forward(rows, columns)
        if len(calls) < 4:  # right at first (the first check passes), then compiled again, wrongly
            return runner._forward(rows, columns)
        counters["stats"]["unique_graphs"] += 1
        return -runner._forward(rows, columns)

    runner.compiled.compiled = broken  # what torch.compile produced, stood in for
    decode_alone(runner, prompts[0], references[0])
    assert not runner.compiled.enabled and runner.decode_path()["compiled"] is False
    assert "decoding eagerly from now on" in caplog.text


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["eager", "graphs"])
def test_random_joins_and_leaves_give_each_row_its_solo_logits(loaded_model, engine, seed, mode):
    """Rows of random prompts join in random groups and leave at random steps (some cut short,
    as a cancel would), over a cache that has to grow: every row's logits at every step are
    those of the same row decoded alone."""
    import random

    rng = random.Random(seed)
    texts = ["a", "a longer prompt " * 3, "describe " * 12, "x " * 30, "two words"]
    requests = [GenerationRequest(text) for text in texts]
    requests.append(GenerationRequest("and a picture", images=[make_image(56, 84)]))
    prompts = [engine.prompts.build(request) for request in requests]
    scripts = [[rng.randrange(10, 300) for _ in range(rng.randrange(4, 40))] for _ in prompts]

    def alone(index: int) -> list[torch.Tensor]:
        runner = ModelRunner(loaded_model, max_rows=1)
        prefilled, logits = runner.prefill([prompts[index]])
        runner.join(prefilled)
        steps = [logits[0].clone()]
        for token in scripts[index][:-1]:
            steps.append(runner.decode([token])[0].clone())
        return steps

    solo = [alone(index) for index in range(len(prompts))]
    runner = ModelRunner(loaded_model, max_rows=4)
    if mode == "graphs":
        runner.use_graphs(eager_replay)
    waiting = list(range(len(prompts)))
    rng.shuffle(waiting)
    running: list[int] = []
    done: dict[int, int] = {}  # prompt -> steps checked
    stops = {index: rng.randrange(1, len(scripts[index]) + 1) for index in range(len(prompts))}

    def check(index: int, logits: torch.Tensor) -> None:
        assert torch.allclose(logits, solo[index][done[index]], atol=1e-4, rtol=1e-4), (seed, index, done[index])
        done[index] += 1

    while waiting or running:
        if waiting and len(running) < 4 and rng.random() < 0.5:
            group = [waiting.pop() for _ in range(min(rng.randrange(1, 3), len(waiting), 4 - len(running)))]
            prefilled, logits = runner.prefill([prompts[index] for index in group])
            runner.join(prefilled)
            for row, index in enumerate(group):
                done[index] = 0
                check(index, logits[row])
            running += group
        if running:
            logits = runner.decode([scripts[index][done[index] - 1] for index in running])
            for row, index in enumerate(running):
                check(index, logits[row])
        staying = [row for row, index in enumerate(running) if done[index] < stops[index]]
        running = [running[row] for row in staying]
        runner.keep(staying)
        assert runner.rows == len(running)
        assert not running or runner.cache.width == max(runner.cache.lengths)
