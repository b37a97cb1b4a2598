"""Tuning timed by the profiler (glm4v_bento/engine/profiled_tuning.py, as served on a GPU): while a compiled step
runs, Inductor's autotuner times candidates with the profiler. A CPU has no Triton kernels to
tune, so Inductor's timing function is replaced here by a recorder (below the unit tested); on a
GPU, tests/test_cuda_paths.py tunes for real. Its speed is a GPU figure (gpu_session's tuning-ab)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from torch._inductor import utils
from torch._inductor.runtime.triton_heuristics import CachingAutotuner

from glm4v_bento.engine.compiled_step import CompiledStep, DecodeParts
from glm4v_bento.engine.profiled_tuning import TIMED_MS, WARMUP_MS, ProfiledTuning


class RecordedBench:
    """Stands in for Inductor's CachingAutotuner.bench: what it was asked, and a timing per way.
    ``profiler``: what the profiler's way does (a timing in ms, or an exception to raise)."""

    def __init__(self, profiler: float | Exception = 0.010) -> None:
        self.calls: list[bool] = []  # with_profiler, per call
        self.profiler = profiler

    def __call__(self, autotuner, launcher, *args, with_profiler: bool = False, **kwargs) -> float:
        self.calls.append(with_profiler)
        if not with_profiler:
            return 0.030
        if isinstance(self.profiler, Exception):
            raise self.profiler
        return self.profiler


@pytest.fixture
def recorded(monkeypatch) -> RecordedBench:
    bench = RecordedBench()
    monkeypatch.setattr(CachingAutotuner, "bench", bench)
    return bench


def test_inside_candidates_are_timed_by_the_profiler_and_outside_as_before(recorded):
    tuning = ProfiledTuning()
    with tuning.active():
        assert CachingAutotuner.bench(object(), "launcher", "arg", stream=0) == 0.010
        assert CachingAutotuner.bench(object(), "launcher") == 0.010
    assert CachingAutotuner.bench(object(), "launcher") == 0.030
    assert recorded.calls == [True, True, False]
    assert tuning.timed == 2 and tuning.fell_back == 0


def test_the_profilers_window_is_shortened_and_given_back(monkeypatch):
    windows = []
    monkeypatch.setattr(utils, "do_bench_using_profiling", lambda fn, warmup, rep, **_: windows.append((warmup, rep)))
    with ProfiledTuning().active():
        utils.do_bench_using_profiling(lambda: None, warmup=10, rep=40)  # as Inductor's bench calls it
    utils.do_bench_using_profiling(lambda: None, warmup=10, rep=40)
    assert windows == [(WARMUP_MS, TIMED_MS), (10, 40)]


@pytest.mark.parametrize(
    "profiler",
    [
        RuntimeError("Failed to divide all profiling events into #repeat groups"),
        ValueError("a launch that cannot run"),  # events score it as Inductor always has
        0.0,  # no kernel events at all (no CUPTI)
    ],
    ids=["profiler error", "launch error", "no events"],
)
def test_a_candidate_the_profiler_cannot_time_is_timed_by_events(monkeypatch, caplog, profiler):
    recorded = RecordedBench(profiler)
    monkeypatch.setattr(CachingAutotuner, "bench", recorded)
    tuning = ProfiledTuning()
    with caplog.at_level(logging.WARNING), tuning.active():
        first = CachingAutotuner.bench(object(), "launcher")
        second = CachingAutotuner.bench(object(), "launcher")
    assert (first, second) == (0.030, 0.030)  # each candidate still gets a timing
    assert recorded.calls == [True, False, True, False]
    assert tuning.fell_back == 2 and tuning.timed == 0
    assert caplog.text.count("events time it instead") == 1  # said once, not per candidate


def test_a_running_profiler_is_not_nested(recorded):
    """Inductor times with events when a profiler already runs (decode_profile's own)."""
    tuning = ProfiledTuning()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]), tuning.active():
        CachingAutotuner.bench(object(), "launcher")
    assert recorded.calls == [False] and tuning.timed == 0


def test_inductors_bench_still_takes_the_profiler_as_patched():
    """What the experiment leans on, in the installed torch: bench's with_profiler keyword, and
    its profiler function looked up when it runs (a torch upgrade that moves either shows here)."""
    assert "with_profiler" in inspect.signature(CachingAutotuner.bench).parameters
    assert "from torch._inductor.utils import do_bench_using_profiling" in inspect.getsource(CachingAutotuner.bench)


@pytest.mark.parametrize("on", [False, True])
def test_a_compiled_step_tunes_under_the_setting_it_was_built_with(recorded, on):
    """The patch holds only while a compiled call runs."""
    seen = []

    def forward(rows, columns, parts):  # the compiled call; tuning would happen inside it
        seen.append(CachingAutotuner.bench is not recorded)
        return torch.zeros(rows, 4)

    step = CompiledStep(forward, DecodeParts(begin=forward, layer=forward, end=forward), profiled_tuning=on)
    step.compiled(1, 16)
    assert seen == [on]
    assert CachingAutotuner.bench is recorded
    assert (step.profiled_tuning is not None) == on


def test_a_cpus_compiled_step_is_not_tuned_by_the_profiler(tiny_model_dir):
    """A CPU's compiled step has no Triton kernels to tune (a GPU's is tuned so unless
    GLM4V_PROFILED_TUNING=false: tests/test_cuda_paths.py)."""
    from glm4v_bento.engine import load_model
    from glm4v_bento.engine.runner import ModelRunner

    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert ModelRunner(loaded, compile_decode=True).compiled.profiled_tuning is None
