"""Shared by the benchmarks: machine description and writing a table into docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}, {_cores()} cores"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {_cores()} cores"


def machine_name() -> str:
    """The GPU when there is one, else the CPU."""
    import torch

    return f"GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else cpu_name()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def write_section(path: Path, section: str, name: str) -> None:
    """Replace the section marked ``name`` in ``path`` (or append it), keeping everything else."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->\n?", re.S)
    found = pattern.search(text)
    path.write_text(pattern.sub(lambda _: section, text) if found else text.rstrip("\n") + "\n\n" + section)


def publish(section: str, output: Path | None, name: str) -> None:
    """Print a benchmark's section and, when asked, write it into the Markdown file."""
    print(section)
    if output:
        write_section(output, section, name)
