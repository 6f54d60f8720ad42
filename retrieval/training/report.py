"""What a run tells: progress callbacks, per-epoch stats, the result, and the final report files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import write_json
from retrieval.preprocess import Preprocess
from retrieval.progress import Progress


@dataclass(frozen=True)
class EpochStats:
    """One line of metrics.jsonl."""

    epoch: int  # 1-based, completed epochs
    epochs: int
    train_loss: float
    train_acc: float  # on augmented training batches, as seen during the epoch
    val_loss: float | None
    val_acc: float | None
    lr: float  # at the end of the epoch
    images_per_s: float  # training phase only (no evaluation or checkpointing)
    train_seconds: float
    epoch_seconds: float  # training + evaluation + checkpoints
    elapsed: float  # since the start of this (possibly resumed) session
    eta_seconds: float
    best: bool  # this epoch wrote best.pt


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns; everything is also on disk in `run_dir`."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    classes: tuple[str, ...]
    epochs_completed: int
    best_epoch: int
    best_val_acc: float | None  # None without a validation set
    history: tuple[EpochStats, ...]  # epochs run in this session
    interrupted: bool  # stopped by Ctrl-C (last.pt holds the state to resume from)
    preprocess: Preprocess
    seconds: float
    finished: bool = True  # every epoch of the schedule is done (not stopped by --stop-after-epochs)


class TrainReporter(Progress):
    """The progress protocol plus training's own callbacks; the CLI renders these with rich."""

    def message(self, text: str) -> None:
        """A note for the user (data found, device, fallbacks): `note` by default."""
        self.note(text)

    def step(self, epoch: int, step: int, steps: int) -> None:
        """After each optimiser step (1-based `step` within 0-based `epoch`)."""

    def epoch(self, stats: EpochStats) -> None:
        """After each epoch's evaluation and checkpoints."""

    def close(self) -> None:
        """Training has ended (normally, by Ctrl-C or by an error): release any live display."""


def confusion_text(conf: np.ndarray, classes: Sequence[str]) -> str:
    """Rows are true classes, columns predicted; a plain fixed-width table."""
    width = max(5, *(len(c) for c in classes), len(str(int(conf.max(initial=0)))))
    head = " " * width + " " + " ".join(c[:width].rjust(width) for c in classes)
    rows = [
        c.rjust(width) + " " + " ".join(str(int(v)).rjust(width) for v in row)
        for c, row in zip(classes, conf, strict=True)
    ]
    return "\n".join([head, *rows])


def confusion_png(conf: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Draw the confusion matrix (row-normalised shading, counts in cells) with PIL only."""
    from PIL import Image, ImageDraw, ImageFont

    k = len(classes)
    cell = max(22, min(48, 900 // max(1, k)))
    try:
        font = ImageFont.load_default(size=max(9, cell // 3))
    except TypeError:  # Pillow without FreeType sizing
        font = ImageFont.load_default()
    label_w = min(220, 12 + 7 * max(len(c) for c in classes))
    top = label_w
    img = Image.new("RGB", (label_w + k * cell + 10, top + k * cell + 30), "white")
    draw = ImageDraw.Draw(img)
    rows = conf.sum(1, keepdims=True).clip(min=1)
    frac = conf / rows
    for i in range(k):
        draw.text((4, top + i * cell + cell // 3), classes[i][:30], fill="black", font=font)
        # Column labels are drawn rotated onto a strip so long class names fit.
        strip = Image.new("RGB", (label_w - 6, cell), "white")
        ImageDraw.Draw(strip).text((2, cell // 3), classes[i][:30], fill="black", font=font)
        img.paste(strip.rotate(90, expand=True), (label_w + i * cell, 4))
        for j in range(k):
            shade = int(255 * (1 - frac[i, j]))
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=colour, outline=(200, 200, 200))
            if conf[i, j]:
                ink = "white" if frac[i, j] > 0.6 else "black"
                draw.text((x0 + 3, y0 + cell // 3), str(int(conf[i, j])), fill=ink, font=font)
    draw.text((4, top + k * cell + 8), "rows: true class, columns: predicted", fill="black", font=font)
    img.save(path)
    return path


def write_report(
    run_dir: Path, classes: Sequence[str], conf: np.ndarray | None, summary: dict[str, Any]
) -> None:
    """report.json, report.txt and confusion.png for the best epoch's validation predictions."""
    report = dict(summary)
    lines = [f"{k}: {v}" for k, v in summary.items()]
    if conf is not None and conf.sum():
        per_class = {
            c: (float(conf[i, i] / conf[i].sum()) if conf[i].sum() else None) for i, c in enumerate(classes)
        }
        report["per_class_accuracy"] = per_class
        report["confusion"] = conf.tolist()
        lines += ["", "per-class validation accuracy:"]
        lines += [
            f"  {c:>20s}  {'n/a' if a is None else f'{a:6.1%}'}  (n={int(conf[i].sum())})"
            for i, (c, a) in enumerate(per_class.items())
        ]
        lines += ["", "confusion matrix (rows: true, columns: predicted):", confusion_text(conf, classes)]
        confusion_png(conf, classes, run_dir / "confusion.png")
    write_json(run_dir / "report.json", report)
    (run_dir / "report.txt").write_text("\n".join(lines) + "\n")
