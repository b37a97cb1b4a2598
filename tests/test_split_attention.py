"""The split-KV attention experiment's checks (tests/split_attention_checks.py), in a process of
their own with Triton's interpreter: Triton decides when it is imported whether it interprets,
and this test process has imported it already, for real kernels."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CHECKS = Path(__file__).with_name("split_attention_checks.py")


def test_split_attention_checks_pass_under_tritons_interpreter():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == 13 and "skipped" not in summary, summary  # every check ran
