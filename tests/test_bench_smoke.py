"""The benchmark scripts still run (tiny sizes): a benchmark that rots is worse than none."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_bench_writes_its_section_and_keeps_the_rest(tiny_model_dir, tmp_path):
    bench = _load("engine_bench")
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
    bench = _load("scheduler_bench")
    output = tmp_path / "benchmarks.md"
    args = ["--model", str(tiny_model_dir), "--long-requests", "2", "--long-tokens", "20"]
    args += ["--short-requests", "3", "--short-tokens", "2", "--interval-ms", "1", "--output", str(output)]
    assert bench.main(args) == 0
    text = output.read_text()
    assert "| static |" in text and "| continuous |" in text and "Continuous p50 / static p50" in text


def test_gpu_bench_tiny_mode_runs_on_the_cpu(tmp_path, capsys):
    bench = _load("gpu_bench")
    assert bench.main(["--tiny", "--concurrency", "2"]) == 0
    table = capsys.readouterr().out
    assert "| 1 |" in table and "| 2 |" in table and "of bound" in table


def test_gpu_bench_real_architecture_matches_the_published_size():
    import torch

    bench = _load("gpu_bench")
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


def test_compare_revisions_runs_a_benchmark_on_both_sides(tiny_model_dir, tmp_path):
    bench = _load("compare_revisions")
    output = tmp_path / "benchmarks.md"
    command = ["bench/engine_bench.py", "--model", str(tiny_model_dir), "--batch-sizes", "1", "2"]
    command += ["--max-new-tokens", "3", "--repeats", "1"]
    assert bench.main(["--base", "HEAD", "--rounds", "1", "--output", str(output), *command]) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2
    for row in rows:
        before, after = (float(cell) for cell in row.strip("|").split("|")[1:3])
        assert before > 0 and after > 0
