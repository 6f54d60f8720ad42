"""The run directory: guards on `--out`, split.json, config.json, skipped.txt and metrics.jsonl."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from retrieval.atomic import write_json
from retrieval.errors import CheckpointError, RetrieveError
from retrieval.paths import user_path
from retrieval.training.data import Split
from retrieval.training.report import EpochStats

# The files of a run directory that a run writes (config.json and split.json are written first).
RUN_FILES = (
    "last.pt",
    "best.pt",
    "metrics.jsonl",
    "skipped.txt",
    "report.json",
    "report.txt",
    "confusion.png",
)


def holds_other_files(run_dir: Path) -> bool:
    """A folder with the user's own files in it: anything visible, unless it is a run's config.json
    (a run killed in its first epoch) and the files written beside it."""
    if not run_dir.is_dir():
        return False
    names = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
    if not names:
        return False
    try:
        info = json.loads((run_dir / "config.json").read_text())
        ours = isinstance(info, dict) and isinstance(info.get("config"), dict) and "arch" in info["config"]
    except (OSError, ValueError):
        ours = False
    return not ours or not names <= {*RUN_FILES, "config.json", "split.json"}


def epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; a torn line (a kill during the append) sorts last, dropped."""
    try:
        return float(json.loads(line)["epoch"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return math.inf


def new_run_dir(out: Path, overwrite: bool) -> Path:
    """The folder for a new run at `out`, refused while it holds a run or other files (unless `overwrite`)."""
    run_dir = user_path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise RetrieveError(f"«out» {run_dir} is a file; give a folder for the run.")
    # A run killed before its first epoch ended left no state worth keeping: start it afresh.
    has_run = (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists()
    if has_run and not overwrite:
        raise RetrieveError(
            f"{run_dir} already holds a training run. Continue it with «resume» {run_dir}, "
            "choose another «out», or pass «overwrite»."
        )
    if not has_run and not overwrite and holds_other_files(run_dir):
        raise RetrieveError(
            f"{run_dir} holds files that are not a `retrieve train` run; a run writes config.json, "
            "report.txt and more there. Choose a new or empty «out», or pass «overwrite»."
        )
    return run_dir


def read_split(split_file: Path) -> Split:
    """The train/validation split a run saved when it started."""
    try:
        return Split.from_dict(json.loads(split_file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{split_file} is damaged ({type(exc).__name__}); without it the run's train/validation "
            "split is unknown and the run cannot be resumed."
        ) from None


def start_afresh(run_dir: Path, split: Split) -> None:
    """Create `run_dir` for a new run, emptied of an earlier run's files, and save the run's split."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # Everything a previous run in this folder wrote: a crash of the new one must not leave the
    # old last.pt (or its skip list) to be resumed or read as this run's.
    for name in (*RUN_FILES, "split.json"):
        (run_dir / name).unlink(missing_ok=True)
    write_json(run_dir / "split.json", split.to_dict())


def write_run_info(run_dir: Path, info: dict[str, Any], problems: Sequence[tuple[str, str]]) -> None:
    """config.json (what the run is), and skipped.txt when files were left out."""
    write_json(run_dir / "config.json", info)
    if problems:
        (run_dir / "skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in problems))


def trim_metrics(run_dir: Path, start_epoch: int) -> Path:
    """metrics.jsonl, holding only the epochs up to `start_epoch` (those the checkpoint has seen)."""
    # metrics.jsonl keeps only epochs the checkpoint has seen (a kill between the two files is harmless).
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        kept = [ln for ln in metrics_file.read_text().splitlines() if epoch_of(ln) <= start_epoch]
        metrics_file.write_text("".join(ln + "\n" for ln in kept))
    return metrics_file


def append_metrics(metrics_file: Path, stats: EpochStats) -> None:
    """One line per completed epoch."""
    with metrics_file.open("a") as fh:
        fh.write(json.dumps(asdict(stats)) + "\n")
