"""`retrieve train`: options -> TrainConfig -> `retrieval.training.train`, rendered with rich."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from retrieval.cli._app import command, console, err_console, esc

if TYPE_CHECKING:
    from rich.progress import TaskID

    from retrieval.training import EpochStats, TrainReporter

_DATA = "Data"
_OPT = "Optimisation"
_RUN = "Runtime"


def _recipe_or(general: str) -> str:
    """Help suffix of a field that the architecture's recipe may set; `general` restates
    retrieval.training.config.GENERAL_DEFAULTS (not imported here: it would pull torch into `--help`)."""
    return f"(default: the architecture's recipe, else {general})"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _epoch_line(s: EpochStats) -> str:
    val = "" if s.val_acc is None else f"  val {s.val_acc:6.1%} (loss {s.val_loss:.3f})"
    best = "  [green]best[/]" if s.best and s.val_acc is not None else ""
    return (
        f"epoch {s.epoch:>3d}/{s.epochs}  loss {s.train_loss:.3f}  train {s.train_acc:6.1%}{val}  "
        f"{s.images_per_s:,.0f} img/s  lr {s.lr:.2e}  {_duration(s.epoch_seconds)}/epoch  "
        f"ETA {_duration(s.eta_seconds)}{best}"
    )


@command("train")
def train_cli(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled folder: DATA/<class>/*.jpg, or DATA/train/<class> + DATA/val/<class> "
            "(or test/). Omit with --resume.",
            show_default=False,
        ),
    ] = None,
    arch: Annotated[
        str, typer.Option("--arch", "-a", help="Architecture (registry name), e.g. resnet18, vgg16, lenet.")
    ] = "resnet18",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run directory. (default: runs/ARCH)", show_default=False),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Length of the schedule. " + _recipe_or("30"), show_default=False),
    ] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="'imagenet' fine-tunes from torchvision weights.", show_default=False)
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(help="Training side in px. (default: the architecture's)", show_default=False),
    ] = None,
    channels: Annotated[
        int | None,
        typer.Option(help="1 or 3. (default: 1 if every image is greyscale)", show_default=False),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(help="Held-out share of each class when there is no val/ split.", rich_help_panel=_DATA),
    ] = 0.1,
    augment: Annotated[
        str,
        typer.Option(
            help="crop (pad + random crop), rrc (random resized crop), none; auto = crop up to 64 px.",
            rich_help_panel=_DATA,
        ),
    ] = "auto",
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="Random horizontal flips.", rich_help_panel=_DATA)
    ] = True,
    crop_pad: Annotated[
        int | None,
        typer.Option(
            help="Crop augmentation: largest shift in px. (default: a 1/8 of the side, 4 px at 32)",
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Validate on the mean of each image's and its mirror's logits. " + _recipe_or("off"),
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help=_recipe_or("128"), show_default=False, rich_help_panel=_OPT),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="sgd (Nesterov) or adamw. " + _recipe_or("sgd"), show_default=False, rich_help_panel=_OPT
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate. (default: the recipe's, else 0.1 sgd / 2e-3 adamw per 128 images; "
            "scaled with the batch size, /10 when fine-tuning)",
            show_default=False,
            rich_help_panel=_OPT,
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            help="(default: the recipe's, else 5e-4 sgd / 0.05 adamw)",
            show_default=False,
            rich_help_panel=_OPT,
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            help="cosine or onecycle, after a linear warm-up. " + _recipe_or("cosine"),
            show_default=False,
            rich_help_panel=_OPT,
        ),
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(help=_recipe_or("1"), show_default=False, rich_help_panel=_OPT),
    ] = None,
    label_smoothing: Annotated[
        float | None,
        typer.Option(help=_recipe_or("0.1"), show_default=False, rich_help_panel=_OPT),
    ] = None,
    norm_bias_lr_scale: Annotated[
        float | None,
        typer.Option(
            help="Learning-rate multiple for the shifts of norm layers. " + _recipe_or("1"),
            show_default=False,
            rich_help_panel=_OPT,
        ),
    ] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help="Max gradient norm.", show_default=False, rich_help_panel=_OPT)
    ] = None,
    seed: Annotated[int, typer.Option(rich_help_panel=_OPT)] = 0,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this directory where it stopped.", show_default=False),
    ] = None,
    stop_after_epochs: Annotated[
        int | None,
        typer.Option(
            help="Stop (resumably) after this many epochs.", show_default=False, rich_help_panel=_RUN
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Write into an --out that holds a previous run or other files (the run's own files there are replaced)."
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.", rich_help_panel=_RUN)] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto, float32, bfloat16, float16 (autocast).", rich_help_panel=_RUN)
    ] = "auto",
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the model.", rich_help_panel=_RUN)
    ] = False,
    deterministic: Annotated[
        bool, typer.Option(help="Deterministic GPU kernels (slower).", rich_help_panel=_RUN)
    ] = False,
    workers: Annotated[int | None, typer.Option(show_default=False, rich_help_panel=_RUN)] = None,
    cache_mb: Annotated[
        int | None,
        typer.Option(
            help="Memory for decoded images; above it, stream from disk. (default: 1/4 of free RAM)",
            show_default=False,
            rich_help_panel=_RUN,
        ),
    ] = None,
) -> None:
    """Train a backbone on labelled folders; its checkpoint indexes with `retrieve index --weights`.

    Folders: DATA/<class>/*.jpg (a seeded --val-fraction of each class is held out for validation), or DATA/train/<class> + DATA/val/<class>. The folder name is the label.

    Examples:

      retrieve train ./labelled --arch resnet8_small --epochs 20 --out runs/r8
      retrieve train ./labelled --arch efficientnet_lite0 --pretrained imagenet   (offline: weights installed)
      retrieve train ./labelled --arch resnet18 --pretrained imagenet --epochs 5
      retrieve train ./digits --arch lenet --no-flip   (no mirrored digits)
      retrieve train ./cifar10 --arch airnet_small   (its recipe: 90.45% on CIFAR-10, 23 min on 2 cores)
      retrieve train --resume runs/r8   (continue a stopped run)
      retrieve index ./photos --weights runs/r8/best.pt   (no other flag needed)

    A few hundred labelled images? Fine-tune, do not train from scratch: `--arch efficientnet_lite0 --pretrained imagenet` (its recipe: AdamW 3e-4, batch 32, 8 epochs) beat its frozen ImageNet features on real photos (ants and bees, MAP@R 0.59 -> 0.74) and on 1,000 CIFAR-10 images (P@10 0.45 -> 0.65, with --augment crop for such small images), while a network trained from scratch wants thousands of images a class (the demo's LeNet gets 1,000). Measured in bench/RESULTS.md.

    Architectures: `retrieve backbones` lists them. An architecture may bring a training recipe (airnet_small and airresnet_small do); the run prints it, config.json records it, and any flag overrides it. resnet8_small / resnet18_small (3x3 stem, no max-pool) and airnet_small / airresnet_small (whitened stem, quickest to train; the latter with residual shortcuts) suit 28-64 px images; resnet18/34/50, vgg*, alexnet and googlenet expect about 224 px.

    The run directory gets config.json, metrics.jsonl (one line per epoch), last.pt and best.pt (written atomically each epoch), and report.txt / report.json / confusion.png. Ctrl-C finishes the current step, saves last.pt and stops; --resume continues from exactly there. Unreadable images are skipped and listed in skipped.txt.
    """
    from retrieval.training import TrainConfig, train

    if resume is None and data is None:
        raise typer.BadParameter("give a DATA folder, or --resume RUN_DIR", param_hint="DATA")
    config = TrainConfig(
        data=data,
        out=out if out is not None or resume is not None else Path("runs") / arch,
        arch=arch,
        pretrained=pretrained,
        image_size=image_size,
        channels=channels,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        grad_clip=grad_clip,
        norm_bias_lr_scale=norm_bias_lr_scale,
        augment=augment,
        flip=flip,
        crop_pad=crop_pad,
        tta=tta,
        val_fraction=val_fraction,
        seed=seed,
        deterministic=deterministic,
        device=device,
        dtype=dtype,
        compile=compile,
        workers=workers,
        cache_mb=cache_mb,
        stop_after_epochs=stop_after_epochs,
        resume=resume,
        overwrite=overwrite,
    )
    reporter = _rich_reporter()
    try:
        result = train(config, reporter)
    finally:
        reporter.close()
    where = result.run_dir
    if result.interrupted:
        err_console.print(
            f"[yellow]stopped[/] after {result.epochs_completed} epochs; state saved to "
            f"{esc(result.last_checkpoint)}. Continue with: retrieve train --resume {esc(where)}"
        )
        raise typer.Exit(130)
    if not result.finished:
        err_console.print(
            f"stopped after {result.epochs_completed} epochs (--stop-after-epochs); continue with: "
            f"retrieve train --resume {where}",
            highlight=False,
            markup=False,
        )
    acc = "n/a (no validation images)" if result.best_val_acc is None else f"{result.best_val_acc:.1%}"
    console.print(
        f"best validation accuracy {acc} at epoch {result.best_epoch}; report in {where / 'report.txt'}\n"
        f"index with: retrieve index IMAGES --weights {result.best_checkpoint}",
        highlight=False,
        markup=False,
    )


def _rich_reporter() -> TrainReporter:
    """Epoch lines on stderr and a transient progress bar within each epoch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from retrieval.training import TrainReporter

    class RichReporter(TrainReporter):
        def __init__(self) -> None:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            self.task: TaskID | None = None

        def message(self, text: str) -> None:
            err_console.print(text, style="dim", highlight=False, markup=False)

        def step(self, epoch: int, step: int, steps: int) -> None:
            if self.task is None:
                self.progress.start()
                self.task = self.progress.add_task("", total=steps, epoch=epoch + 1)
            self.progress.update(self.task, completed=step, total=steps, epoch=epoch + 1)

        def epoch(self, stats: EpochStats) -> None:
            self.close()
            err_console.print(_epoch_line(stats), highlight=False)

        def close(self) -> None:
            if self.task is not None:
                self.progress.remove_task(self.task)
                self.progress.stop()
                self.task = None

    return RichReporter()
