"""Resumable state: what last.pt holds to continue a run, and how a resumed run is checked and restored."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.checkpoint import Checkpoint, load_checkpoint
from retrieval.errors import CheckpointError, RetrieveError, first_line
from retrieval.paths import user_path
from retrieval.training.config import TrainConfig
from retrieval.training.step import StepRunner

# Fields that `--resume` may change: where and how the run executes, never what it computes.
RESUME_OVERRIDES = ("device", "dtype", "workers", "compile", "cache_mb", "stop_after_epochs")


def zero_partial() -> dict[str, Any]:
    """The sums of an epoch's steps before an interruption, when there are none."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


@dataclass
class Progress:
    """Where a run stands: the epoch and step to go on from, and its best epoch so far."""

    start_epoch: int = 0  # epochs completed when this session began (0-based index of its first)
    start_step: int = 0  # steps of that epoch already taken (an interrupted epoch resumes after them)
    best_acc: float | None = None
    best_epoch: int = 0
    best_conf: np.ndarray | None = None  # validation confusion matrix of the best epoch
    partial: dict[str, Any] = field(default_factory=zero_partial)  # sums of the `start_step` steps


def rng_state() -> dict[str, Any]:
    """The global generators' states (CPU, and every GPU's where there are any)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a different GPU count: the CPU state is what matters
            torch.cuda.set_rng_state_all(state["cuda"])


def resume_config(config: TrainConfig) -> tuple[TrainConfig, Checkpoint, Path]:
    """The config a `--resume` run continues with, its last checkpoint and its run directory."""
    assert config.resume is not None
    path = user_path(config.resume)
    if not path.exists():
        raise CheckpointError(f"No training run at {path} to resume.")
    ckpt_path = path / "last.pt" if path.is_dir() else path
    if path.is_dir() and not ckpt_path.is_file():
        started = (path / "config.json").is_file()
        raise CheckpointError(
            f"{path} has no last.pt to resume from: "
            + (
                "the run stopped before its first epoch ended, so there is nothing to continue; "
                f"start it again with `retrieve train DATA --out {path}`."
                if started
                else "it is not a `retrieve train` run directory."
            )
        )
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt.extra.get("resume") if isinstance(ckpt.extra, dict) else None
    saved = ckpt.extra.get("config") if isinstance(ckpt.extra, dict) else None
    if not isinstance(state, dict) or not isinstance(saved, dict):
        raise CheckpointError(
            f"{ckpt_path} carries no training state, so it cannot be resumed (only indexed)."
        )
    saved_cfg = TrainConfig.from_dict(saved)
    if saved_cfg.arch != ckpt.arch:
        raise CheckpointError(f"{ckpt_path} says arch {ckpt.arch!r} but its config says {saved_cfg.arch!r}.")
    # A resumed run computes what it started computing. A field set away from its default that
    # disagrees with the run is a mistake to report, not a setting to drop (a flag given at its
    # default value cannot be told apart from an absent one, and is ignored).
    fixed = {f.name: f.default for f in fields(TrainConfig)}
    for name in (*RESUME_OVERRIDES, "data", "out", "resume", "overwrite"):
        fixed.pop(name)
    # Settings the run chose itself (None in its config) are compared with what it chose.
    size = ckpt.preprocess.size
    chosen = {
        "image_size": size,
        "channels": ckpt.in_channels,
        "crop_pad": max(1, size // 8) if saved_cfg.crop_pad is None else saved_cfg.crop_pad,
    }

    def ran_with(k: str) -> Any:
        value = getattr(saved_cfg, k)
        return chosen.get(k, value) if value is None else value

    conflicts = [
        f"«{k}» {getattr(config, k)} (the run has {ran_with(k)})"
        for k, default in fixed.items()
        if getattr(config, k) != default and getattr(config, k) != ran_with(k)
    ]
    if conflicts:
        raise RetrieveError(
            f"«resume» continues {ckpt_path.parent} as it was started; it cannot change "
            f"{'; '.join(conflicts)}. Start a new run («out») to train differently."
        )
    overrides = {k: getattr(config, k) for k in RESUME_OVERRIDES}
    if config.data is not None:
        overrides["data"] = config.data  # the images may have moved
    run_dir = ckpt_path.parent
    return replace(saved_cfg, **overrides, out=run_dir, resume=config.resume, overwrite=False), ckpt, run_dir


def restore(ckpt: Checkpoint, runner: StepRunner, resume: Path | None) -> Progress:
    """Load the model, optimiser, schedule, scaler and RNG of `ckpt` into this run; return its progress."""
    assert runner.scheduler is not None
    state = ckpt.extra["resume"]
    try:
        runner.model.load_state_dict(ckpt.state_dict)
        runner.optimizer.load_state_dict(state["optimizer"])
        runner.scheduler.load_state_dict(state["scheduler"])
        runner.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{resume}: the saved state does not fit this run ({first_line(exc)})."
        ) from None
    set_rng_state(state["rng"])
    progress = Progress(start_epoch=int(state["epoch"]), start_step=int(state["step"]))
    progress.best_acc = state.get("best_val_acc")
    progress.best_epoch = int(state.get("best_epoch", 0))
    if state.get("best_confusion") is not None:
        progress.best_conf = state["best_confusion"].numpy()
    progress.partial = dict(state.get("partial", progress.partial))
    return progress


def resume_state(
    runner: StepRunner, progress: Progress, epoch: int, step: int, part: dict[str, Any]
) -> dict[str, Any]:
    """What last.pt carries to continue at `step` of `epoch`, with `part` the sums of that epoch so far."""
    assert runner.scheduler is not None
    return {
        "epoch": epoch,
        "step": step,
        "optimizer": runner.optimizer.state_dict(),
        "scheduler": runner.scheduler.state_dict(),
        "scaler": runner.scaler.state_dict(),
        "rng": rng_state(),
        "best_val_acc": progress.best_acc,
        "best_epoch": progress.best_epoch,
        "best_confusion": None if progress.best_conf is None else torch.from_numpy(progress.best_conf),
        "partial": part,
    }
