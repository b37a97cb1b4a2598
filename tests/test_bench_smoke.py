"""The benchmark scripts still run (tiny sizes): a benchmark that rots is worse than none."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    """A bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def test_engine_bench_writes_its_section_and_keeps_the_rest(tiny_model_dir, tmp_path):
    bench = load_bench("engine_bench")
    output = tmp_path / "benchmarks.md"
    output.write_text("# Benchmarks\n\nkept paragraph\n")
    args = ["--model", str(tiny_model_dir), "--batch-sizes", "1", "2", "--max-new-tokens", "3", "--repeats", "1"]
    assert bench.main([*args, "--output", str(output)]) == 0
    assert bench.main([*args, "--output", str(output)]) == 0  # rerun replaces, not appends
    text = output.read_text()
    assert "kept paragraph" in text
    assert text.count("## Engine throughput") == 1
    assert "| 2 |" in text


def test_scheduler_bench_runs_both_policies(tiny_model_dir, tmp_path):
    bench = load_bench("scheduler_bench")
    output = tmp_path / "benchmarks.md"
    args = ["--model", str(tiny_model_dir), "--long-requests", "2", "--long-tokens", "20"]
    args += ["--short-requests", "3", "--short-tokens", "2", "--interval-ms", "1", "--output", str(output)]
    assert bench.main(args) == 0
    text = output.read_text()
    assert "| static |" in text and "| continuous |" in text and "Continuous p50 / static p50" in text


def test_gpu_bench_tiny_mode_runs_on_the_cpu(tmp_path, capsys):
    bench = load_bench("gpu_bench")
    assert bench.main(["--tiny", "--concurrency", "2"]) == 0
    table = capsys.readouterr().out
    assert "| 1 |" in table and "| 2 |" in table and "of bound" in table
    assert "| 1, after the 112x112 image |" in table  # one stream over an image prompt's context
    # On a CPU steps are waited for (as served there); the other setting, same engine, same run.
    assert "| 1, steps overlapped (GLM4V_OVERLAP_STEPS=true) |" in table and "each waited for." in table


@pytest.mark.parametrize("switches", [[], ["--no-split-attention", "--no-profiled-tuning"]])
def test_gpu_bench_reports_the_attention_and_tuning_a_gpu_would_take(capsys, switches):
    """The split-KV and profiled-tuning switches (as served, both off). A CPU compiles no Triton
    kernels and attends with SDPA: the report claims neither there."""
    bench = load_bench("gpu_bench")
    assert bench.main(["--tiny", "--compile", "--concurrency", "2", *switches]) == 0
    table = capsys.readouterr().out
    assert "decode steps compiled (torch.compile)" in table and "| 2 |" in table
    assert "split-KV" not in table and "profiled kernel time" not in table


def test_gpu_bench_real_architecture_matches_the_published_size():
    import torch

    bench = load_bench("gpu_bench")
    loaded = bench.build_model(False, torch.device("meta"), torch.bfloat16)  # shapes only, no memory
    parameters = sum(p.numel() for p in loaded.model.parameters())
    assert 10.0e9 < parameters < 10.6e9  # GLM-4.1V-9B-Thinking: about 10.3 B with the vision tower
    text = loaded.model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads, text.vocab_size) == (
        40,
        4096,
        2,
        151552,
    )
    # A decode step reads the text weights (about 17.6 GB in bf16), not the vision tower or embedding table.
    assert 17.0e9 < bench.decode_weight_bytes(loaded.model) < 18.0e9


@pytest.mark.parametrize("base", ["revision", "folder"])
def test_compare_revisions_runs_a_benchmark_on_both_sides(tiny_model_dir, tmp_path, base):
    bench = load_bench("compare_revisions")
    output = tmp_path / "benchmarks.md"
    if base == "revision":
        base_args = ["--base", "HEAD"]
    else:  # where git is missing (a GPU machine gets files, not the repository)
        folder = tmp_path / "base"
        folder.mkdir()
        archive = subprocess.run(["git", "archive", "HEAD", "glm4v_bento", "bench"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        base_args = ["--base-tree", str(folder)]
    command = ["bench/engine_bench.py", "--model", str(tiny_model_dir), "--batch-sizes", "1", "2"]
    command += ["--max-new-tokens", "3", "--repeats", "1"]
    assert bench.main([*base_args, "--rounds", "1", "--keep-after", "--output", str(output), *command]) == 0
    report = output.read_text()
    comparison = report[report.index("<!-- cpu-before-after:start -->") : report.index("<!-- cpu-before-after:end -->")]
    rows = [line for line in comparison.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2
    for row in rows:
        before, after = (float(cell) for cell in row.strip("|").split("|")[1:3])
        assert before > 0 and after > 0
    # --keep-after: the newer side's own table is kept too, under its own section name
    assert "<!-- engine-throughput:start -->" in report


def test_compare_revisions_marks_rows_the_older_script_does_not_measure(tmp_path):
    """The older side runs its own copy of the script, which may measure fewer rows (the GPU
    bench's image-prompt row is newer than the engine before the GPU work): '-', not a number."""
    bench = load_bench("compare_revisions")
    older = tmp_path / "base" / "bench"
    older.mkdir(parents=True)
    table = "| sequences | decode tokens/s |\n|---:|---:|\n| 1 | 10.0 |\n| 8 | 80.0 |"
    (older / "gpu_bench.py").write_text(f"print({table!r})\n")
    output = tmp_path / "benchmarks.md"
    command = ["bench/gpu_bench.py", "--tiny", "--concurrency", "2"]
    assert bench.main(["--base-tree", str(tmp_path / "base"), "--rounds", "1", "--output", str(output), *command]) == 0
    rows = {line.split("|")[1].strip(): line for line in output.read_text().splitlines() if line.startswith("| 1")}
    before, after, ratio = (cell.strip() for cell in rows["1"].strip("|").split("|")[1:4])
    assert before == "10.0" and float(after) > 0 and float(ratio) > 0
    image_row = next(line for key, line in rows.items() if key.startswith("1, after the"))
    assert image_row.strip("|").split("|")[1].strip() == "-" and image_row.rstrip().endswith("| - |")
    assert "| 8 |" not in output.read_text()  # only what the newer side measured is compared


def test_compare_revisions_tries_a_setting_against_this_tree_compiling_afresh_each_run(tmp_path, monkeypatch, capsys):
    """--setting: both sides run this tree, the flag added on one only; --fresh-compile-cache:
    every run gets an Inductor cache of its own, gone after it. The table gives each side's
    lowest and highest round beside the medians."""
    bench = load_bench("compare_revisions")
    runs = []

    def fake_run(command, env, **kwargs):
        cache = Path(env["TORCHINDUCTOR_CACHE_DIR"])
        assert cache.is_dir() and str(bench.ROOT) in env["PYTHONPATH"]
        runs.append((command, cache))
        rate = 110.0 + len(runs) if "--store-mlp-activation" in command else 100.0 + len(runs)
        table = f"| sequences | decode tokens/s |\n|---:|---:|\n| 1 | {rate} |\n"
        return subprocess.CompletedProcess(command, 0, stdout=table)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    output = tmp_path / "benchmarks.md"
    arguments = ["--setting=--store-mlp-activation", "--fresh-compile-cache", "--rounds", "2"]
    assert bench.main([*arguments, "--output", str(output), "--", "bench/gpu_bench.py", "--concurrency"]) == 0
    flagged = [command for command, _ in runs if command[-1] == "--store-mlp-activation"]
    assert len(runs) == 4 and len(flagged) == 2  # alternately, the flag on one side only
    assert all(str(bench.ROOT / "bench" / "gpu_bench.py") in command for command, _ in runs)
    caches = {cache for _, cache in runs}
    assert len(caches) == 4 and not any(cache.exists() for cache in caches)
    text = output.read_text()
    assert "## Without and with `--store-mlp-activation`" in text and "each run compiling and tuning afresh" in text
    assert "| sequences | decode tokens/s: without | decode tokens/s: with --store-mlp-activation |" in text
    # rounds: with 111, without 102, with 113, without 104 -> medians 103 and 112
    assert "| 1 | 103.0 | 112.0 | 1.09 | 102.0-104.0; 111.0-113.0 |" in text
    logged = capsys.readouterr().err  # each run's own tables too (its bound, its copy bandwidth)
    assert all(f"| 1 | {rate} |" in logged for rate in (111.0, 102.0, 113.0, 104.0))


# The steps a GPU session runs first, on the newest code. Walking every step takes four minutes here,
# so it is a slow test, run by `make gpu-kit` before a session and by `make test-slow`.
FIRST_STEPS = ["gpu-tests", "served", "defaults-ab", "split-ab"]
FIRST_SECTIONS = ["gpu-bench", "gpu-defaults-ab", "gpu-split-attention-ab"]


def walk_gpu_session(steps: list[str], tmp_path: Path) -> str:
    """Run gpu_session.sh's ``steps`` with --tiny on the CPU; its report. The steps are independent:
    two sessions take half of them each, side by side, to keep the test short."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_BENCH_ARGS": "--tiny --concurrency 2"}
    env["BASE_TREE"] = str(tmp_path / "none")  # the before/after step is tested with compare_revisions
    sessions = []
    for half in (steps[0::2], steps[1::2]):
        out = tmp_path / f"session-{len(sessions)}"
        command = ["bash", str(BENCH / "gpu_session.sh")]
        started = subprocess.Popen(command, env={**env, "OUT": str(out), "STEPS": " ".join(half)}, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        sessions.append((out, started))
    report = ""
    for out, started in sessions:
        printed, _ = started.communicate(timeout=600)
        assert started.returncode == 0, printed[-3000:]
        report += (out / "benchmarks.md").read_text()
        assert "== " in (out / "log.txt").read_text()  # each step is logged
    return report


def session_steps() -> list[str]:
    """What a lent GPU machine runs by default, in its order (the list for a machine without a base tree)."""
    script = (BENCH / "gpu_session.sh").read_text()
    return re.findall(r'default_steps="([^"]+)"', script)[-1].split()


@pytest.mark.slow
def test_gpu_session_script_walks_every_step_on_the_cpu(tmp_path):
    """Every step a lent GPU machine runs by default, with --tiny on the CPU, so none rots unseen
    (the compile-restart step is compile_bench --restart's test too)."""
    steps = session_steps()
    assert len(steps) > 10 and set(FIRST_STEPS) <= set(steps[:6])  # the most wanted still run first
    report = walk_gpu_session(steps, tmp_path)
    sections = set(re.findall(r"<!-- ([a-z0-9-]+):start -->", report))
    assert len(sections) == len(steps) - 1  # a section of its own from each step but gpu-tests
    assert set(FIRST_SECTIONS) <= sections
    assert "| 2 |" in report
    # compile-restart: the second process found the first one's compiled graphs in their shared cache
    hits = re.search(r"found in the cache: (\d+) at the first start, (\d+) at the restart", report)
    assert hits and int(hits[1]) == 0 and int(hits[2]) > 0


@pytest.mark.slow
def test_gpu_session_compares_with_the_base_tree_where_there_is_no_git(tmp_path):
    """A lent machine may have no git: the before/after step works from the folder alone."""
    base = tmp_path / "base"
    base.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD", "glm4v_bento", "bench"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
    tools = tmp_path / "bin"  # what the script calls, and no git
    tools.mkdir()
    for tool in ("dirname", "mkdir", "tee", "date"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_BENCH_ARGS": "--tiny --concurrency 2"}
    env.update(BASE_TREE=str(base), STEPS="before-after", PATH=str(tools))
    done = subprocess.run(
        [shutil.which("bash"), str(BENCH / "gpu_session.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- gpu-before-after:start -->" in report and "vs this tree" in report
    assert "| 2 |" in report  # the session's short settings, overridden by GPU_BENCH_ARGS


def test_gpu_session_goes_on_past_a_failed_step_and_says_so(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_BENCH_ARGS": "--tiny --concurrency 2"}
    env.update(BASE_TREE=str(tmp_path / "none"), STEPS="before-after eager")
    done = subprocess.run(["bash", str(BENCH / "gpu_session.sh")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "<!-- gpu-bench-eager:start -->" in (tmp_path / "benchmarks.md").read_text()
    assert "failed: before-after" in (tmp_path / "log.txt").read_text()


def test_gpu_session_script_runs_only_the_steps_asked_for(tmp_path):
    """A lent machine's call has a time limit: the steps can be spread over several calls."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_BENCH_ARGS": "--tiny --concurrency 2"}
    env["STEPS"] = "eager"
    done = subprocess.run(["bash", str(BENCH / "gpu_session.sh")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- gpu-bench-eager:start -->" in report
    assert "<!-- gpu-bench:start -->" not in report and "prefill-chunks" not in report


def test_decode_step_bench_runs_eager_and_compiled(tiny_model_dir, tmp_path):
    bench = load_bench("decode_step_bench")
    output = tmp_path / "benchmarks.md"
    args = ["--model", str(tiny_model_dir), "--rows", "2", "--capacities", "512", "2048", "--steps", "2"]
    assert bench.main([*args, "--output", str(output)]) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith(("| eager |", "| compiled |"))]
    assert len(rows) == 4


def test_image_upload_bench_measures_through_the_server(tiny_model_dir, tmp_path):
    bench = load_bench("image_upload_bench")
    output = tmp_path / "benchmarks.md"
    args = ["--model", str(tiny_model_dir), "--clients", "1", "--requests", "2", "--images", "2", "--side", "96"]
    assert bench.main([*args, "--output", str(output)]) == 0
    text = output.read_text()
    assert "| images/s |" in text and "| /health p99 (ms) |" in text
    assert bench.main([*args, "--api", "openai", "--output", str(output)]) == 0
    assert "`/v1/chat/completions`" in output.read_text()


def test_prefill_chunk_bench_compares_whole_and_chunked(tiny_model_dir, tmp_path):
    bench = load_bench("prefill_chunk_bench")
    output = tmp_path / "benchmarks.md"
    args = ["--model", str(tiny_model_dir), "--chunks", "0", "32", "--prompt-words", "60", "--streams", "2"]
    assert bench.main([*args, "--repeats", "1", "--output", str(output)]) == 0
    text = output.read_text()
    assert "| 0 |" in text and "| 32 |" in text and "longest pause" in text


def test_image_arrival_bench_measures_the_running_streams_pause(tiny_model_dir, tmp_path):
    bench = load_bench("image_arrival_bench")
    output = tmp_path / "benchmarks.md"
    args = ["--model", str(tiny_model_dir), "--size", "300x200", "--counts", "1", "2", "--streams", "2"]
    assert bench.main([*args, "--repeats", "1", "--output", str(output)]) == 0
    text = output.read_text()
    assert "300x200 photos" in text and "| 1 |" in text and "| 2 |" in text


def test_step_overhead_bench_splits_each_step_into_model_and_host(tiny_model_dir, tmp_path):
    bench = load_bench("step_overhead_bench")
    output = tmp_path / "benchmarks.md"
    args = ["--model", str(tiny_model_dir), "--rows", "1", "4", "--tokens", "8", "--output", str(output)]
    assert bench.main(args) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith(("| 1 |", "| 4 |"))]
    assert len(rows) == 2
    for row in rows:
        step, forward, host = (float(cell) for cell in row.strip("|").split("|")[1:4])
        assert 0 < forward < step and host > 0


def test_compile_bench_times_each_event_and_stays_compiled(tmp_path):
    bench = load_bench("compile_bench")
    output = tmp_path / "benchmarks.md"
    assert bench.main(["--layers", "2", "--long-prompt-words", "60", "--output", str(output)]) == 0
    text = output.read_text()
    assert "Still compiled at the end: yes" in text
    events = [line for line in text.splitlines() if line.startswith("| ") and "event" not in line]
    assert len(events) == 5 and events[0].startswith("| first step: 1 row (compiles for one row) |")
    assert all(float(line.strip("|").split("|")[1]) > 0 for line in events)


def test_decode_profile_splits_a_step_into_groups_and_kernels(tmp_path):
    bench = load_bench("decode_profile")
    output = tmp_path / "benchmarks.md"
    arguments = ["--steps", "2", "--top", "5", "--timed-steps", "3", "--flex", "--store-mlp-activation"]
    assert bench.main([*arguments, "--fuse-rotary", "--sdpa-attention", "--output", str(output)]) == 0
    text = output.read_text()
    assert "**Decode step**" in text and "**Prefill of one 112x112 image" in text
    assert "**Decode step, FlexAttention**" in text and "**Decode step, SDPA attention**" in text
    assert "**Decode step, MLP activation stored**" in text
    assert "**Decode step, rotary embedding fused**" in text
    assert text.count("**Decode step of 1 row(s) over") == 4  # timed as served, stored, fused, SDPA
    assert "| matrix multiply |" in text and "| attention |" in text
    shares = [int(line.rsplit("|", 2)[1].strip().rstrip("%")) for line in text.splitlines() if line.endswith("% |")]
    assert shares and all(0 <= share <= 100 for share in shares)


def test_decode_profile_times_each_variant_with_graphs_in_a_pool_of_its_own(tmp_path, monkeypatch):
    """The profile times the step as served, then with the MLP activation stored, each from
    CUDA graphs. The first one's graphs are gone by the second, and PyTorch refuses a capture
    into a memory pool whose graphs were all freed: a stand-in capture enforces that here."""
    import weakref

    bench = load_bench("decode_profile")

    def pool_checking_capture():
        live: dict[int, weakref.WeakSet] = {}

        def capture(step, pool):
            if pool in live and not live[pool]:
                raise RuntimeError(f"capture into memory pool {pool}, whose graphs were all freed")
            logits = step()

            def replay() -> None:
                logits.copy_(step())

            live.setdefault(pool, weakref.WeakSet()).add(replay)
            return replay, logits

        return capture

    monkeypatch.setattr(bench, "new_capture", lambda device: pool_checking_capture())
    output = tmp_path / "benchmarks.md"
    arguments = ["--steps", "2", "--top", "3", "--timed-steps", "2", "--store-mlp-activation"]
    assert bench.main([*arguments, "--output", str(output)]) == 0
    text = output.read_text()
    assert text.count("replayed from a CUDA graph, steps back to back") == 2
    assert "capture failed" not in text


@pytest.mark.parametrize(
    ("kernel", "group"),
    [
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),  # SDPA's memory-efficient kernel
        ("split_attention_partials", "attention"),  # the split-KV experiment's two Triton kernels
        ("split_attention_combine", "attention"),
        ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "matrix multiply"),  # cuBLAS
        ("triton_red_fused_mm_1", "matrix multiply"),  # Inductor's one-row reduction for an mm
        ("triton_red_fused_add_mm_7", "matrix multiply"),
        ("triton_red_fused_bmm_4", "fused (Triton)"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused (Triton)"),  # RMSNorm
        ("triton_poi_fused_cat_mm_mul_silu_3", "fused (Triton)"),  # pointwise, reads no weight
    ],
)
def test_decode_profile_counts_each_kernel_in_its_group(kernel, group):
    """Matrix multiplies give the profile's read bandwidth: attention must not count among them."""
    assert load_bench("decode_profile").group_of(kernel) == group


def test_decode_profile_lists_each_kernels_launch_sizes_from_the_trace():
    """What a GPU profile's Chrome trace says of each kernel (its shape, as PyTorch's profiler
    writes it), through to the table's launch column."""
    bench = load_bench("decode_profile")

    def kernel(name: str, grid: list[int], block: list[int]) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "args": {"grid": grid, "block": block, "stream": 7}}

    trace = {
        "traceEvents": [
            kernel("triton_red_fused_mm_t_view_0", [144, 1, 1], [256, 1, 1]),
            kernel("triton_red_fused_mm_t_view_0", [144, 1, 1], [256, 1, 1]),  # each step launches it again
            kernel("triton_red_fused_mm_t_transpose_view_7", [512, 1, 1], [64, 1, 1]),
            kernel("triton_red_fused_mm_t_transpose_view_7", [256, 1, 1], [128, 1, 1]),  # a second compilation
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "args": {}},
            kernel("cudnn_sdpa", [1, 32, 1], [128, 1, 1]) | {"cat": "Kernel"},  # as older Kineto versions write it
        ]
    }
    launches = bench.launch_sizes(trace)
    assert launches == {
        "triton_red_fused_mm_t_view_0": "grid 144, block 256",
        "triton_red_fused_mm_t_transpose_view_7": "grid 256, block 128; grid 512, block 64",
        "cudnn_sdpa": "grid 32, block 128",
    }
    times = {"triton_red_fused_mm_t_view_0": (40, 400.0), "cudnn_sdpa": (40, 300.0), "Memset (Device)": (40, 30.0)}
    lines = bench.table("Decode step", times, 1, 3, "kernel", launches)
    assert "| kernel | calls per step | µs per step | share | launch |" in lines
    assert "| `triton_red_fused_mm_t_view_0` | 40 | 400.0 | 55% | grid 144, block 256 |" in lines
    assert "| `Memset (Device)` | 40 | 30.0 | 4% |  |" in lines  # no launch sizes in the trace


def test_decode_profile_sets_each_kernels_time_per_call_beside_what_its_tuning_measured():
    """Coordinate-descent tuning's verdicts, read from its debug log as Inductor writes them (ms),
    through to the table: the kernel's time per call in the step, and its tuned time alone."""
    import logging

    bench = load_bench("decode_profile")
    tuner = bench.TunerTimings()
    log = logging.getLogger(bench.TunerTimings.LOGGER)
    message = "%s: Improve from %s %f -> %s %f, %.3fx"
    level, propagate = log.level, log.propagate
    with tuner.listening():
        log.debug("= Do coordinate descent tuning for %s =", "triton_red_fused_mm_t_view_0")
        log.debug(message, "triton_red_fused_mm_t_view_0", "XBLOCK: 1", 0.0142, "XBLOCK: 4", 0.0091, 1.56)
    log.debug(message, "triton_poi_fused_1", "XBLOCK: 64", 0.003, "XBLOCK: 128", 0.002, 1.5)  # not listening
    assert tuner.tuned == {"triton_red_fused_mm_t_view_0": pytest.approx((9.1, 14.2))}
    assert (log.level, log.propagate) == (level, propagate)  # the logger as it was

    times = {"triton_red_fused_mm_t_view_0": (40, 880.0), "cudnn_sdpa": (40, 300.0)}
    lines = bench.table("Decode step", times, 1, 2, "kernel", {}, tuner.tuned)
    assert "| kernel | calls per step | µs per step | share | µs per call | tuned alone: kept (first tried) |" in lines
    assert "| `triton_red_fused_mm_t_view_0` | 40 | 880.0 | 75% | 22.0 | 9.1 (14.2) |" in lines
    assert "| `cudnn_sdpa` | 40 | 300.0 | 25% | 7.5 |  |" in lines  # a library kernel: not tuned


def test_decode_profile_profiles_the_rotary_fused_then_gives_the_served_step_back(loaded_model):
    """The experiment's step is compiled anew with the options; the experiments after it (and the
    engine's options) find the served step and options again."""
    from glm4v_bento.engine import compiled_step
    from glm4v_bento.engine.runner import ModelRunner

    bench = load_bench("decode_profile")
    runner = ModelRunner(loaded_model, max_rows=2, compile_decode=True, cuda_graphs=False)
    served, options = runner.compiled, dict(compiled_step.COMPILE_OPTIONS)
    with bench.rotary_fused(runner):
        assert runner.compiled is not served
        assert runner.compiled.options == {**options, **compiled_step.FUSED_ROTARY_OPTIONS}
    assert runner.compiled is served and options == compiled_step.COMPILE_OPTIONS


def test_decode_profile_times_the_same_step_replayed_without_growing_the_cache():
    """The step timings replay the last step in place: the cache neither grows nor moves, and
    the runner is left without graphs for the profiles that follow."""
    bench = load_bench("decode_profile")
    from gpu_bench import build_model

    from glm4v_bento.engine import GenerationRequest
    from glm4v_bento.engine.prompt import PromptBuilder
    from glm4v_bento.engine.runner import ModelRunner

    loaded = build_model(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    runner = ModelRunner(loaded, max_rows=2)
    prompt = PromptBuilder(loaded.processor, max_images=1).build(GenerationRequest("describe " * 10))
    prefilled, _ = runner.prefill([prompt])
    runner.join(prefilled)
    for _ in range(3):
        runner.decode([1])
    width, generation = runner.cache.width, runner.cache.generation
    replays = []

    def capture(step, pool):
        logits = step()
        return (lambda: replays.append(logits.copy_(step()))), logits

    lines = bench.step_timings(runner, 1000.0, 10**9, 10**12, 4, capture)
    assert (runner.cache.width, runner.cache.generation) == (width, generation)
    assert runner.graphs is None
    assert len(replays) == 1 + 2 * 3 * 4  # the capture's check, then two ways x three runs x four steps
    rows = [line for line in lines if line.startswith("| replayed from a CUDA graph")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 for row in rows)


def test_arrival_harness_waits_for_plain_steps_however_slow_they_come():
    """On a loaded machine the first decode steps may come late: the arrival must wait for
    them (it used to wait a fixed 50 ms and then found no step before the arrival)."""
    import threading
    import time

    arrival = load_bench("arrival")

    class Handle:
        def cancel(self) -> None:
            pass

        def result(self, timeout: float) -> None:
            return None

    class SlowEngine:  # its streams run at once, but its steps start 0.2 s later, then every 5 ms
        running = 2

        def __init__(self) -> None:
            self.scheduler = type("Scheduler", (), {"on_step": None})()
            self.stopped = threading.Event()

        def submit(self, request):
            return Handle()

        def steps(self) -> None:
            time.sleep(0.2)
            while not self.stopped.is_set():
                hook = self.scheduler.on_step
                if hook is not None:
                    hook(2, 0)
                time.sleep(0.005)

    engine = SlowEngine()
    thread = threading.Thread(target=engine.steps, daemon=True)
    thread.start()
    try:
        pause, result = arrival.pause_while_arriving(engine, 2, lambda: time.sleep(0.03) or "answer")
    finally:
        engine.stopped.set()
        thread.join()
    assert result == "answer" and 0 < pause < 1000


def test_startup_bench_times_a_real_start_in_a_table_compare_revisions_reads(tiny_model_dir, tmp_path):
    bench, compare = load_bench("startup_bench"), load_bench("compare_revisions")
    output = tmp_path / "benchmarks.md"
    assert bench.main(["--model", str(tiny_model_dir), "--runs", "1", "--output", str(output)]) == 0
    header, rows = compare.parse_table(output.read_text())
    assert header[:2] == ["from launch to", "seconds (median)"]
    assert 0 < rows["answering HTTP"] <= rows["ready"] < 120
