"""Coordinate-descent tuning timed by each candidate kernel's own device time: as served for a
compiled step on a GPU (GLM4V_PROFILED_TUNING=false, or the benchmarks' --no-profiled-tuning,
turns it off).

Inductor tunes a kernel's launch sizes by timing each candidate between two CUDA events around its
launch. For the one-row step's small kernels, the host's work in that launch (cloning arguments,
Python) outlasts the kernel itself: on an H200 (docs/benchmarks.md, 2026-11-27) the tuner measured
21-37 µs for projections that took 9-13 µs a call in the step, and 20-116 µs for 3 µs norms. The
candidates then differ by less than the noise, and the launch it keeps is close to a draw. The same
kernel in three compilations took 10.1, 11.3 and 13.5 µs a call, and the down projection 33.2-38.2.
The fastest of the three for each of the four projections would take 0.44 ms a step less than the
served step's launches: 7% of its kernel time.

With this on, Inductor times each candidate with the profiler instead (its own
``do_bench_using_profiling``: the kernels' device time, without the host's), over a shorter
window than its default, so that tuning takes seconds more, not minutes (36-37 s for the
one-row step on an H200, against 30 s). A candidate the profiler cannot time is timed as before,
with events (a warning says so once). On an H200, with the split-KV attention kernels too, two
compilations of one stream's step ran at 185.6 and 185.8 tokens/s, where two without either ran
at 147.5 and 161.9 (2026-11-27, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

logger = logging.getLogger(__name__)

# The profiler's window per candidate, in ms (Inductor's own: 10 warm-up, 40 timed). Each run
# clears the L2 cache first (256 MB written), so a one-row kernel still runs about a hundred
# times in it.
WARMUP_MS = 5
TIMED_MS = 10


class ProfiledTuning:
    """Counts the candidates the profiler timed, and those events timed after it failed."""

    def __init__(self) -> None:
        self.timed = 0
        self.fell_back = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While inside, Inductor's autotuner times candidates with the profiler."""
        from torch._inductor import utils
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
        from torch.autograd import profiler as autograd_profiler

        event_timed_bench = CachingAutotuner.bench
        by_profiler = utils.do_bench_using_profiling
        tuning = self

        def bench(autotuner: Any, launcher: Any, *args: Any, with_profiler: bool = False, **kwargs: Any) -> float:
            if autograd_profiler._is_profiler_enabled:  # a profiler runs already, and profilers don't nest
                return event_timed_bench(autotuner, launcher, *args, **kwargs)
            try:
                result = event_timed_bench(autotuner, launcher, *args, with_profiler=True, **kwargs)
                failure = None if result > 0 else "the profiler recorded no kernel"  # no CUPTI: no events
            except Exception as error:  # the profiler's own, or a launch the events would score as invalid
                failure = repr(error)
            if failure is None:
                tuning.timed += 1
                return result
            if not tuning.fell_back:
                logger.warning(
                    "timing a candidate kernel with the profiler failed (%s); events time it instead", failure
                )
            tuning.fell_back += 1
            # Inductor's own timing, which scores a launch that cannot run as infinitely slow
            return event_timed_bench(autotuner, launcher, *args, **kwargs)

        def shorter(fn: Any, warmup: int = WARMUP_MS, rep: int = TIMED_MS, **kwargs: Any) -> float:
            return by_profiler(fn, warmup=min(warmup, WARMUP_MS), rep=min(rep, TIMED_MS), **kwargs)

        # bench imports do_bench_using_profiling when it runs, so patching the module's name reaches it
        with (
            mock.patch.object(CachingAutotuner, "bench", bench),
            mock.patch.object(utils, "do_bench_using_profiling", shorter),
        ):
            yield
