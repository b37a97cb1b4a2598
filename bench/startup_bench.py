"""Start-up time of `bentoml serve`: from launch to answering HTTP, and to ready.

Starts the real server on the model --runs times, one after the other, and times two moments
from the launch: when /readyz first answers (any status: BentoML's own process has read the
service, and the worker is up and loading), and when it answers 200 (model loaded and warmed
up). On the tiny model nearly all of it is Python importing modules, twice: in BentoML's
process and in the worker. The table goes to stdout and, with --output, into a marked section.

    python bench/startup_bench.py --model .models/tiny --runs 5
    python bench/compare_revisions.py --base HEAD~1 --rounds 3 -- bench/startup_bench.py --runs 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_name, publish

from glm4v_bento.devserver import Server

SECTION = "startup"


def one_start(model: str, log: Path) -> tuple[float, float]:
    """Seconds from launch to the first HTTP answer, and to ready."""
    started = time.monotonic()
    server = Server(model, log)
    try:
        server.wait_listening()
        listening = time.monotonic() - started
        server.wait_ready()
        return listening, time.monotonic() - started
    finally:
        server.stop()


def render(times: list[tuple[float, float]], args: argparse.Namespace) -> str:
    def row(label: str, values: list[float]) -> str:
        return f"| {label} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |"

    return (
        "\n".join(
            [
                f"<!-- {SECTION}:start -->",
                "## Start-up: `bentoml serve` to ready",
                "",
                f"`bench/startup_bench.py`, {date.today().isoformat()}, model `{args.model}`, {len(times)} starts "
                f"on this machine ({args.machine}), one after the other.",
                "",
                "| from launch to | seconds (median) | min-max |",
                "|---|---:|---:|",
                row("answering HTTP", [listening for listening, _ in times]),
                row("ready", [ready for _, ready in times]),
                f"<!-- {SECTION}:end -->",
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".models/tiny", help="checkpoint directory, hub id or model-store tag")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.machine = cpu_name()
    times = []
    with tempfile.TemporaryDirectory() as logs:
        for run in range(args.runs):
            listening, ready = one_start(args.model, Path(logs) / f"serve{run}.log")
            times.append((listening, ready))
            print(f"# start {run + 1}: HTTP after {listening:.1f} s, ready after {ready:.1f} s", file=sys.stderr)
    publish(render(times, args), args.output, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
