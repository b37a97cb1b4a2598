"""Before/after in one run: a benchmark run alternately on an older revision and on this tree.

The older revision is checked out into a temporary git worktree (or, where there is no
git, given as a folder with --base-tree: `git archive REV | tar -x -C DIR`); both sides run the same
benchmark command on the same machine, interleaved round by round (so drift in machine
load hits both), and the first two columns of each side's Markdown table are compared:
the row label (batch size, sequences...) and its figure (tokens/s...). Medians over rounds.

    python bench/compare_revisions.py --base 904f9a2 --output docs/benchmarks.md \\
        -- bench/engine_bench.py --model .models/tiny
    python bench/compare_revisions.py --base 904f9a2 --section gpu-before-after --keep-after -- bench/gpu_bench.py

--setting compares this tree with itself: as it is, and with some arguments added to the benchmark
(an A/B of one setting, e.g. an experiment's flag). --fresh-compile-cache gives every run its own
Inductor cache, so each compiles and tunes afresh: on a GPU a compiled step's speed moves from one
compilation to the next, and the rounds then sample that spread on both sides (min-max column).

    python bench/compare_revisions.py --setting=--store-mlp-activation --fresh-compile-cache --rounds 3 \
        --section gpu-mlp-activation-ab -- bench/gpu_bench.py --concurrency --decode-tokens 128

--keep-after also writes the newer side's own section (its full table, as the script printed it)
into the output: one run then gives both the comparison and the headline figures. The newer side
runs first in each round, so its section is written even if the older code then fails.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine_name, publish, write_section

ROOT = Path(__file__).resolve().parent.parent


def run_side(tree: Path, command: list[str], fresh_compile_cache: bool = False) -> str:
    """Run the benchmark script from ``tree`` (its package first on the path) -> what it printed.
    ``fresh_compile_cache``: with an Inductor cache of its own, so that it compiles and tunes afresh."""
    script, *args = command
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    own_cache = tempfile.TemporaryDirectory(prefix="glm4v-inductor-") if fresh_compile_cache else nullcontext()
    with own_cache as cache:
        if cache is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        # stderr (progress, warnings) goes straight through: a long GPU run shows where it is.
        done = subprocess.run(
            [sys.executable, str(tree / script), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"{script} failed in {tree} (exit status {done.returncode}; its errors are above)")
    return done.stdout


def own_sections(output: str) -> dict[str, str]:
    """The marked sections a benchmark printed, by name."""
    found = re.finditer(r"<!-- (?P<name>[\w-]+):start -->.*?<!-- (?P=name):end -->\n?", output, re.S)
    return {match["name"]: match[0] for match in found}


def parse_table(output: str) -> tuple[list[str], dict[str, float]]:
    lines = [line for line in output.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        raise SystemExit(f"no Markdown table in the benchmark's output:\n{output[-2000:]}")
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = float(cells[1].split()[0])
    return header, rows


def describe(tree: Path, revision: str) -> str:
    """A short name for the code in ``tree``: its commit (marked dirty if changed), else "this tree"
    (a copy without its repository, or a machine without git)."""
    command = (
        ["git", "describe", "--always", "--dirty"] if revision == "HEAD" else ["git", "rev-parse", "--short", revision]
    )
    try:
        done = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False)
    except OSError:  # no git at all
        return "this tree"
    return done.stdout.strip() if done.returncode == 0 else "this tree"


@contextmanager
def base_tree(args: argparse.Namespace) -> Iterator[tuple[Path, str]]:
    """The older code: a given folder, or the revision checked out into a temporary worktree
    (with --setting: this tree itself, without the setting)."""
    if args.setting is not None:
        yield ROOT, "without"
        return
    if args.base_tree:
        marker = args.base_tree / "REVISION"  # written by `make gpu-kit`
        yield args.base_tree.resolve(), marker.read_text().strip() if marker.exists() else args.base_tree.name
        return
    with tempfile.TemporaryDirectory(prefix="glm4v-base-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            yield tree, describe(tree, "HEAD")  # the worktree's own commit: never "dirty", as ROOT may be
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="the older revision (commit, tag, branch), checked out for the run")
    base.add_argument("--base-tree", type=Path, help="or a directory holding it already (no git needed)")
    base.add_argument(
        "--setting",
        metavar="ARGS",
        help="or this tree against itself with ARGS added to the benchmark's arguments (write --setting=--flag)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--fresh-compile-cache",
        action="store_true",
        help="each run compiles and tunes with an Inductor cache of its own",
    )
    parser.add_argument("--section", default="cpu-before-after", help="name of the section in the output file")
    parser.add_argument("--output", type=Path, help="Markdown file to write the table into")
    parser.add_argument(
        "--keep-after", action="store_true", help="also write the newer side's own section(s) into --output"
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="benchmark script (from the repo root) and its arguments"
    )
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        parser.error("name the benchmark script to run, e.g. -- bench/engine_bench.py --model .models/tiny")

    current = describe(ROOT, "HEAD") if args.setting is None else f"with {args.setting}"
    added = args.setting.split() if args.setting else []
    before: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}
    with base_tree(args) as (tree, base_label):
        for round_number in range(1, args.rounds + 1):
            for label, side, results, extra in ((current, ROOT, after, added), (base_label, tree, before, [])):
                print(f"# round {round_number}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
                printed = run_side(side, [*args.command, *extra], args.fresh_compile_cache)
                print(printed, file=sys.stderr, flush=True)  # each run's own tables (copy bandwidth, bound) in the log
                if results is after and args.keep_after and args.output:
                    for name, section in own_sections(printed).items():
                        write_section(args.output, section, name)
                header, rows = parse_table(printed)
                for key, value in rows.items():
                    results.setdefault(key, []).append(value)

    title = "Before and after" if args.setting is None else f"Without and with `{args.setting}`"
    ratio = "after / before" if args.setting is None else "with / without"
    spread = args.rounds > 1  # each side's lowest and highest round: how far one run can be from another
    lines = [
        f"<!-- {args.section}:start -->",
        f"## {title}: `{' '.join(args.command)}`",
        "",
        f"`bench/compare_revisions.py`, {date.today().isoformat()}, {machine_name()}. "
        f"Base {base_label} vs {current}, run alternately, median of {args.rounds} rounds each"
        f"{', each run compiling and tuning afresh' if args.fresh_compile_cache else ''}.",
        "",
        f"| {header[0]} | {header[1]}: {base_label} | {header[1]}: {current} | {ratio} |"
        + (" lowest-highest round |" if spread else ""),
        "|---:|---:|---:|---:|" + ("---|" if spread else ""),
    ]

    def extent(values: list[float]) -> str:
        return f"{min(values):.1f}-{max(values):.1f}"

    for key in after:
        new = statistics.median(after[key])
        if key not in before:  # a row the older script does not measure
            lines.append(f"| {key} | - | {new:.1f} | - |" + (f" {extent(after[key])} |" if spread else ""))
            continue
        old = statistics.median(before[key])
        row = f"| {key} | {old:.1f} | {new:.1f} | {new / old:.2f} |"
        lines.append(row + (f" {extent(before[key])}; {extent(after[key])} |" if spread else ""))
    lines.append(f"<!-- {args.section}:end -->")
    publish("\n".join(lines) + "\n", args.output, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
