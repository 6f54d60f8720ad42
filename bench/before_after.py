"""Compare two checkouts of retrieve in one run: the demo's table and bench/extract.py's ratios.

A restructuring promises "behaviour unchanged"; this measures it. Each checkout runs its own code
(PYTHONPATH=<tree>) in a fresh folder, and the two are interleaved (old, new, old, new) so that a
machine that slows down part-way affects both alike.

    python bench/before_after.py OLD_TREE NEW_TREE [--n 2000] [--rounds 2] [--skip-demo]

Make OLD_TREE with `git worktree add --detach /tmp/old <commit>`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATIO = re.compile(r"RATIO end-to-end / (forward-only|naive loop)\s+=\s+([\d.]+)")
RATE = re.compile(r"^(end-to-end|forward-only|naive)[^:]*:\s+([\d.]+) img/s", re.M)


def _run(tree: Path, args: list[str], cwd: Path, timeout: float = 1800) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "RETRIEVE_STATE_DIR": str(cwd / "state")}
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out.stdout, time.perf_counter() - t


def demo_table(tree: Path, work: Path) -> tuple[str, float]:
    """The demo's stdout table (the lines between the caption and the summary)."""
    stdout, seconds = _run(tree, ["-m", "retrieval", "demo", str(work / "demo"), "--fresh"], work)
    lines = [
        line for line in stdout.splitlines() if "│" in line or "┃" in line or line.startswith(("┏", "┡", "└"))
    ]
    return "\n".join(lines), seconds


def table_values(table: str) -> dict[tuple[str, str], str]:
    """(space, column) -> cell of a printed table, whatever order its columns come in (#21 moved
    the most telling first) and however many tables it was split into at the terminal's width."""
    values: dict[tuple[str, str], str] = {}
    header: list[str] = []
    for line in table.splitlines():
        if line.startswith("┃"):
            header = [c.strip() for c in line.strip("┃").split("┃")]
        elif line.startswith("│") and header:
            cells = [c.strip() for c in line.strip("│").split("│")]
            for column, cell in zip(header[1:], cells[1:], strict=True):
                values[(cells[0], column)] = cell
    return values


def extract(tree: Path, work: Path, n: int) -> dict[str, float]:
    stdout, _ = _run(tree, [str(tree / "bench" / "extract.py"), "--n", str(n), "--memory", ""], work)
    figures = {f"{k} img/s": float(v) for k, v in RATE.findall(stdout)}
    figures |= {f"e2e/{k}": float(v) for k, v in RATIO.findall(stdout)}
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--n", type=int, default=2000, help="JPEGs for bench/extract.py")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved extract rounds per tree")
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    with tempfile.TemporaryDirectory(prefix="before-after-") as tmp:
        work = Path(tmp)
        for name in trees:
            (work / name).mkdir()
        if not args.skip_demo:
            tables = {}
            for name, tree in trees.items():
                tables[name], seconds = demo_table(tree, work / name)
                print(f"demo ({name}, {seconds:.0f} s):\n{tables[name]}\n", flush=True)
            old, new = table_values(tables["old"]), table_values(tables["new"])
            print(f"demo tables identical as text: {tables['old'] == tables['new']}", flush=True)
            print(
                f"demo values identical (by space and column, {len(new)} cells): {old == new}\n", flush=True
            )
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                figures = extract(tree, work / name, args.n)
                runs[name].append(figures)
                print(f"extract round {r + 1} {name}: {figures}", flush=True)
        for key in runs["old"][0]:
            old = [f[key] for f in runs["old"] if key in f]
            new = [f[key] for f in runs["new"] if key in f]
            print(
                f"{key:24s} old {' '.join(f'{v:.2f}' for v in old)}  new {' '.join(f'{v:.2f}' for v in new)}"
                f"  new/old {sum(new) / max(sum(old), 1e-9):.3f}"
            )


if __name__ == "__main__":
    main()
