"""`train(TrainConfig) -> TrainResult`: the epoch loop over a prepared run, stoppable and resumable."""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retrieval.checkpoint import Checkpoint, save_checkpoint
from retrieval.errors import RetrieveError
from retrieval.training.config import TrainConfig
from retrieval.training.report import EpochStats, TrainReporter, TrainResult, write_report
from retrieval.training.rundir import append_metrics, new_run_dir, start_afresh, trim_metrics, write_run_info
from retrieval.training.setup import Run, prepare
from retrieval.training.state import Progress, restore, resume_config, zero_partial
from retrieval.training.step import step_seed


class _StopFlag:
    """Ctrl-C sets a flag checked after each step, so a step is never cut in half; a second Ctrl-C
    raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass(frozen=True)
class _Sums:
    """What the steps of one epoch add up to (`carried`: the sums from before an interruption)."""

    carried: dict[str, Any]
    loss: torch.Tensor  # summed over the images, on the device
    correct: torch.Tensor
    seen: int


def train(config: TrainConfig, reporter: TrainReporter | None = None) -> TrainResult:
    """Train `config.arch` on `config.data`; write checkpoints, metrics and a report to `config.out`.

    Ctrl-C stops after the current step, saves last.pt (mid-epoch state included) and returns with
    `interrupted=True`; `TrainConfig(resume=run_dir)` then continues exactly where it stopped.
    """
    t_start = time.perf_counter()
    rep = reporter or TrainReporter()
    ckpt: Checkpoint | None = None
    if config.resume is not None:
        config, ckpt, run_dir = resume_config(config)
    else:
        assert config.out is not None
        run_dir = new_run_dir(config.out, config.overwrite)
    run = prepare(config, ckpt, run_dir, rep)
    progress = _begin(run, ckpt, rep)
    history, interrupted, completed = _epochs(run, progress, rep)
    return _finish(run, progress, history, interrupted, completed, t_start)


def _begin(run: Run, ckpt: Checkpoint | None, rep: TrainReporter) -> Progress:
    """Restore a resumed run's state, or empty the folder for a new run; then write config.json."""
    if ckpt is not None:
        progress = restore(ckpt, run.runner, run.config.resume)
        rep.message(
            f"resuming {run.run_dir} at epoch {progress.start_epoch + 1}"
            + (f", step {progress.start_step + 1}" if progress.start_step else "")
        )
    else:
        progress = Progress()
        start_afresh(run.run_dir, run.split)
    info = run.info()
    write_run_info(run.run_dir, info, run.problems)
    if run.problems:
        rep.message(f"{len(run.problems)} files skipped (see {run.run_dir / 'skipped.txt'})")
    rep.message(
        f"{run.spec.name} ({info['parameters'] / 1e6:.2f}M parameters) on {run.runtime.describe()}, "
        f"{run.augment.mode} augmentation"
    )
    return progress


def _epochs(run: Run, progress: Progress, rep: TrainReporter) -> tuple[list[EpochStats], bool, int]:
    """Train on from `progress` to the end of the schedule, --stop-after-epochs or Ctrl-C.

    Returns (this session's epochs, interrupted, epochs completed in all)."""
    config = run.config
    metrics_file = trim_metrics(run.run_dir, progress.start_epoch)
    history: list[EpochStats] = []
    interrupted = False
    completed = progress.start_epoch
    if progress.start_epoch >= config.epochs:
        rep.message(f"{run.run_dir} has already finished all {config.epochs} epochs: nothing to train")
    session_start = time.perf_counter()
    epoch_times: list[float] = []
    end_epoch = config.epochs
    if config.stop_after_epochs is not None:
        end_epoch = min(end_epoch, config.stop_after_epochs)
    run.runner.model.train()
    with _StopFlag() as stop:
        for epoch in range(progress.start_epoch, end_epoch):
            t_epoch = time.perf_counter()
            sums = _train_epoch(run, progress, epoch, stop, rep, t_epoch)
            if sums is None:
                interrupted = True
                break
            stats = _end_epoch(run, progress, epoch, sums, t_epoch, session_start, epoch_times)
            append_metrics(metrics_file, stats)
            completed = stats.epoch
            history.append(stats)
            rep.epoch(stats)
            if stop.set:
                interrupted = completed < config.epochs
                break
    return history, interrupted, completed


def _train_epoch(
    run: Run, progress: Progress, epoch: int, stop: _StopFlag, rep: TrainReporter, t_epoch: float
) -> _Sums | None:
    """The optimiser steps of one epoch; None when Ctrl-C stopped it midway (last.pt holds where)."""
    config, bs = run.config, run.config.batch_size
    shuffle = torch.Generator().manual_seed(step_seed(config.seed, epoch, -1))
    order = torch.randperm(len(run.train_src), generator=shuffle)[: run.steps_per_epoch * bs]
    skip = progress.start_step if epoch == progress.start_epoch else 0
    # Sums from the part of this epoch run before an interruption (zero otherwise).
    carried = progress.partial if skip else zero_partial()
    loss_sum = torch.zeros((), device=run.runtime.device)
    correct = torch.zeros((), dtype=torch.long, device=run.runtime.device)
    seen = 0
    gen = torch.Generator()
    step = skip
    for x, y in run.train_src.batches(order, bs, skip):
        gen.manual_seed(step_seed(config.seed, epoch, step))
        loss, corr = run.runner(x, y, gen)
        loss_sum += loss
        correct += corr
        seen += len(y)
        step += 1
        rep.step(epoch, step, run.steps_per_epoch)
        if stop.set and step < run.steps_per_epoch:
            part = {
                "loss": float(carried["loss"]) + float(loss_sum),
                "correct": int(carried["correct"]) + int(correct),
                "seen": int(carried["seen"]) + seen,
                "seconds": float(carried["seconds"]) + time.perf_counter() - t_epoch,
            }
            save_checkpoint(run.checkpoint(progress, epoch, step, part), run.run_dir / "last.pt")
            return None
    return _Sums(carried, loss_sum, correct, seen)


def _end_epoch(
    run: Run,
    progress: Progress,
    epoch: int,
    sums: _Sums,
    t_epoch: float,
    session_start: float,
    epoch_times: list[float],
) -> EpochStats:
    """Evaluate a finished epoch, save last.pt (and best.pt when it is the best) and measure it."""
    config, carried, runner = run.config, sums.carried, run.runner
    assert runner.scheduler is not None
    if run.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    session_seconds = time.perf_counter() - t_epoch
    total_seen = int(carried["seen"]) + sums.seen
    train_loss = (float(carried["loss"]) + float(sums.loss)) / max(1, total_seen)
    if not math.isfinite(train_loss):
        # Checked before saving: last.pt and best.pt keep the last finite epoch.
        raise RetrieveError(
            f"Training diverged: the loss became {train_loss} in epoch {epoch + 1}. Start a new "
            f"run with a lower «lr» (this one used {config.lr:g}) or with «grad_clip» 1."
        )
    train_acc = (int(carried["correct"]) + int(sums.correct)) / max(1, total_seen)
    val_loss = val_acc = None
    conf = None
    if len(run.val_src):
        val_loss, val_acc, conf = runner.evaluate(run.val_src, 2 * config.batch_size, len(run.classes))
    # Without a validation set every epoch is "best": best.pt is then the latest model.
    is_best = val_acc is None or progress.best_acc is None or val_acc > progress.best_acc
    if is_best:
        progress.best_acc, progress.best_epoch, progress.best_conf = val_acc, epoch + 1, conf
    ck = run.checkpoint(progress, epoch + 1, 0, zero_partial())
    save_checkpoint(ck, run.run_dir / "last.pt")
    if is_best:
        save_checkpoint(ck, run.run_dir / "best.pt")
    completed = epoch + 1
    epoch_seconds = time.perf_counter() - t_epoch
    epoch_times.append(epoch_seconds)
    return EpochStats(
        epoch=completed,
        epochs=config.epochs,
        train_loss=train_loss,
        train_acc=train_acc,
        val_loss=val_loss,
        val_acc=val_acc,
        lr=float(runner.scheduler.get_last_lr()[0]),
        images_per_s=sums.seen / max(1e-9, session_seconds),
        train_seconds=float(carried["seconds"]) + session_seconds,
        epoch_seconds=epoch_seconds,
        elapsed=time.perf_counter() - session_start,
        eta_seconds=(config.epochs - completed) * float(np.mean(epoch_times)),
        best=is_best,
    )


def _finish(
    run: Run,
    progress: Progress,
    history: list[EpochStats],
    interrupted: bool,
    completed: int,
    t_start: float,
) -> TrainResult:
    """Write the report of a run that ran to its end (or to --stop-after-epochs) and say what it did."""
    config = run.config
    summary = {
        "arch": run.spec.name,
        "classes": len(run.classes),
        "epochs_completed": completed,
        "epochs": config.epochs,
        "best_epoch": progress.best_epoch,
        "best_val_accuracy": progress.best_acc,
        "train_images": len(run.train_src),
        "val_images": len(run.val_src),
        "finished": completed >= config.epochs,
    }
    if completed > 0 and not interrupted:
        write_report(run.run_dir, run.classes, progress.best_conf, summary)
    return TrainResult(
        run_dir=run.run_dir,
        best_checkpoint=run.run_dir / "best.pt",
        last_checkpoint=run.run_dir / "last.pt",
        classes=run.classes,
        epochs_completed=completed,
        best_epoch=progress.best_epoch,
        best_val_acc=progress.best_acc,
        history=tuple(history),
        interrupted=interrupted,
        preprocess=run.pre,
        seconds=time.perf_counter() - t_start,
        finished=completed >= config.epochs,
    )
