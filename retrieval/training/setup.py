"""Everything a run builds before its first step: recipe, split, inputs, sources, model and optimiser."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.backbones import BackboneSpec, get_spec
from retrieval.checkpoint import Checkpoint
from retrieval.device import Runtime, resolve_runtime
from retrieval.errors import CheckpointError, EmptyInputError, RetrieveError
from retrieval.images import Transform
from retrieval.paths import user_path
from retrieval.preprocess import Preprocess
from retrieval.training.augment import Augment
from retrieval.training.config import TrainConfig, with_recipe
from retrieval.training.data import (
    ImageSource,
    Split,
    all_greyscale,
    available_memory,
    discover,
    measure_stats,
)
from retrieval.training.model import build_model, init_from_data, probe, trainable_archs
from retrieval.training.optim import make_optimizer, make_scheduler
from retrieval.training.report import TrainReporter
from retrieval.training.rundir import read_split
from retrieval.training.state import Progress, resume_state
from retrieval.training.step import StepRunner


@dataclass(frozen=True)
class Run:
    """A run ready to train: its settings and everything built from them."""

    config: TrainConfig  # the recipe filled in
    spec: BackboneSpec
    runtime: Runtime
    run_dir: Path
    split: Split
    channels: int
    pre: Preprocess  # recorded in every checkpoint: what `index --weights` decodes with
    augment: Augment
    train_src: ImageSource
    val_src: ImageSource
    cache: bool  # decoded once into memory (else streamed from disk)
    problems: list[tuple[str, str]]  # (file, reason) for every file left out
    runner: StepRunner  # holds the model, the optimiser and the schedule
    steps_per_epoch: int

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in label order."""
        return self.split.classes

    def checkpoint(self, progress: Progress, epoch: int, step: int, part: dict[str, Any]) -> Checkpoint:
        """The model, with the state to resume from at `step` of `epoch`."""
        state = resume_state(self.runner, progress, epoch, step, part)
        return Checkpoint(
            arch=self.spec.name,
            state_dict={key: v.detach().cpu() for key, v in self.runner.model.state_dict().items()},
            classes=self.classes,
            preprocess=self.pre,
            num_classes=len(self.classes),
            in_channels=self.channels,
            extra={"config": self.config.to_dict(), "resume": state, "epoch": epoch},
        )

    def info(self) -> dict[str, Any]:
        """What config.json records about the run."""
        return {
            "config": self.config.to_dict(),
            "classes": list(self.classes),
            "train_images": len(self.train_src),
            "val_images": len(self.val_src),
            "preprocess": self.pre.to_dict(),
            "augment": {"mode": self.augment.mode, "pad": self.augment.pad, "flip": self.augment.flip},
            "runtime": self.runtime.describe(),
            "cached_in_memory": self.cache,
            "steps_per_epoch": self.steps_per_epoch,
            "parameters": sum(p.numel() for p in self.runner.model.parameters()),
            "torch": torch.__version__,
        }


def prepare(config: TrainConfig, ckpt: Checkpoint | None, run_dir: Path, rep: TrainReporter) -> Run:
    """Fill in the recipe, split and decode the data, and build the model, optimiser and schedule
    (restored from `ckpt` later, when the run resumes)."""
    assert config.data is not None
    spec, config = _recipe(config, rep)
    runtime = resolve_runtime(config.device, config.dtype)
    data = user_path(config.data)
    split = _split(config, ckpt, data, run_dir)
    k = len(split.classes)
    train_paths = [data / p for p, _ in split.train]
    val_paths = [data / p for p, _ in split.val]
    channels = _channels(config, ckpt, train_paths + val_paths, rep)

    # Seeded before building, so --seed fixes the initial weights (and a new head when fine-tuning).
    torch.manual_seed(config.seed)
    if ckpt is None:
        model, weights_pre = build_model(spec, k, channels, config.pretrained)
    else:
        model, weights_pre = spec.builder(k, channels), None
    size, mode, stored = _sizes(config, spec, weights_pre)
    transform = Transform(Preprocess(size=stored, resize=stored, channels=channels))
    train_src, val_src, cache = _sources(config, split, train_paths, val_paths, transform, runtime, rep)
    problems = [(str(p), r) for p, r in split.problems] + [
        (str(p), r) for p, r in train_src.problems + val_src.problems
    ]
    if len(train_src) == 0:
        raise EmptyInputError(f"No decodable training images in {data}.")

    # ---- preprocessing recorded in the checkpoint
    if ckpt is not None:
        pre = ckpt.preprocess
    else:
        if weights_pre is not None:
            mean, std = weights_pre.mean, weights_pre.std
        else:
            mean, std = measure_stats(train_src.images, train_src.paths, transform)
        # The index decodes with resize=stored then centre-crops `size`: exactly the eval path here.
        pre = Preprocess(size=size, resize=stored, mean=mean, std=std, channels=channels)
    augment = Augment(
        mode=mode,
        size=size,
        pad=max(1, size // 8) if config.crop_pad is None else config.crop_pad,
        flip=config.flip,
        mean=pre.mean[:channels],
        std=pre.std[:channels],
        channels_last=runtime.channels_last,
    )

    model = _place(model, config, runtime)
    probe(model, spec.name, channels, size, runtime)
    if ckpt is None and config.pretrained is None and hasattr(model, "init_from_data"):
        # Data-dependent init (AirNet's whitened stem); a resumed run restores it from the checkpoint.
        init_from_data(model, train_src, augment, config.seed)
    runner, steps_per_epoch = _runner(model, config, runtime, augment, len(train_src))
    return Run(
        config=config,
        spec=spec,
        runtime=runtime,
        run_dir=run_dir,
        split=split,
        channels=channels,
        pre=pre,
        augment=augment,
        train_src=train_src,
        val_src=val_src,
        cache=cache,
        problems=problems,
        runner=runner,
        steps_per_epoch=steps_per_epoch,
    )


def _recipe(config: TrainConfig, rep: TrainReporter) -> tuple[BackboneSpec, TrainConfig]:
    """The architecture, and `config` with its recipe filled in (said when it set anything)."""
    spec = get_spec(config.arch)
    if spec.builder is None:
        raise RetrieveError(
            f"{spec.name} has nothing to train; choose one of {', '.join(trainable_archs())}."
        )
    unset = {k for k, _ in spec.recipe if getattr(config, k) is None}
    config = with_recipe(config)
    if unset:
        used = ", ".join(f"{k}={getattr(config, k)}" for k, _ in spec.recipe if k in unset)
        rep.message(f"{spec.name}'s training recipe: {used} (flags override)")
    return spec, config


def _split(config: TrainConfig, ckpt: Checkpoint | None, data: Path, run_dir: Path) -> Split:
    """A new run's split of `data`, or the one a resumed run saved (with the same classes)."""
    split_file = run_dir / "split.json"
    if ckpt is not None and not data.is_dir():
        raise EmptyInputError(
            f"The run's data folder {data} is not there any more; if it moved, give its new place: "
            f"retrieve train NEW_FOLDER --resume {run_dir}"
        )
    if ckpt is not None and split_file.is_file():
        split = read_split(split_file)
    else:
        split = discover(data, config.val_fraction, config.seed)
    if ckpt is not None and tuple(ckpt.classes) != split.classes:
        raise CheckpointError(
            f"The classes in {data} ({', '.join(split.classes)}) differ from the run's "
            f"({', '.join(ckpt.classes)}); resume needs the same data."
        )
    return split


def _channels(config: TrainConfig, ckpt: Checkpoint | None, paths: list[Path], rep: TrainReporter) -> int:
    """1 or 3: the run's, the flag's, else 1 when every image is greyscale."""
    if ckpt is not None:
        return ckpt.in_channels
    if config.channels is not None:
        return config.channels
    channels = 1 if all_greyscale(paths) else 3
    if channels == 1:
        rep.message("every image is greyscale: training on 1 channel (override with «channels» 3)")
    return channels


def _sizes(config: TrainConfig, spec: BackboneSpec, weights_pre: Preprocess | None) -> tuple[int, str, int]:
    """(training side, augmentation mode, side of the stored decoded images)."""
    base = weights_pre or spec.preprocess
    size = config.image_size or base.size
    if spec.fixed_size is not None and size != spec.fixed_size:
        title = spec.description.split(" ")[0] or spec.name  # "LeNet-5"
        raise RetrieveError(
            f"{title} takes {spec.fixed_size}x{spec.fixed_size} inputs; use «image_size» "
            f"{spec.fixed_size} (smaller images are upscaled)."
        )
    if config.crop_pad is not None and config.crop_pad >= size:
        raise RetrieveError(f"«crop_pad» {config.crop_pad} must be smaller than the {size} px training side.")
    mode = config.augment if config.augment != "auto" else ("crop" if size <= 64 else "rrc")
    # rrc zooms into a slightly larger stored image; evaluation centre-crops it (the 224/256 rule).
    stored = round(size / 0.875) if mode == "rrc" else size
    return size, mode, stored


def _sources(
    config: TrainConfig,
    split: Split,
    train_paths: list[Path],
    val_paths: list[Path],
    transform: Transform,
    runtime: Runtime,
    rep: TrainReporter,
) -> tuple[ImageSource, ImageSource, bool]:
    """Training and validation images, decoded once into memory when they fit the cache budget."""
    channels, stored = transform.pre.channels, transform.pre.size
    workers = config.workers if config.workers is not None else min(8, os.cpu_count() or 1)
    n_images = len(train_paths) + len(val_paths)
    need = n_images * channels * stored * stored
    budget = (available_memory() // 4) if config.cache_mb is None else config.cache_mb << 20
    cache = need <= budget
    rep.message(
        f"{len(train_paths)} training and {len(val_paths)} validation files in {len(split.classes)} classes; "
        + (
            f"decoding them once into memory ({need / 2**20:.0f} MiB at {stored}px)"
            if cache
            else f"streaming from disk ({need / 2**20:.0f} MiB would exceed the {budget / 2**20:.0f} MiB cache budget)"
        )
    )
    train_src = ImageSource(
        train_paths, [y for _, y in split.train], transform, workers, cache, runtime.device
    )
    val_src = ImageSource(val_paths, [y for _, y in split.val], transform, workers, cache, runtime.device)
    return train_src, val_src, cache


def _place(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """The model on the run's device and memory format, with determinism as asked."""
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _runner(
    model: nn.Module, config: TrainConfig, runtime: Runtime, augment: Augment, n_train: int
) -> tuple[StepRunner, int]:
    """The step runner with its optimiser and schedule, and the number of steps in an epoch."""
    bs = config.batch_size
    # Drop the ragged last batch (a batch of one breaks batch norm, and fixed shapes keep
    # torch.compile from recompiling), unless the set is smaller than one batch.
    steps_per_epoch = max(1, n_train // bs)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    runner = StepRunner(
        model,
        optimizer,
        scheduler,
        runtime,
        augment,
        config.label_smoothing,
        config.grad_clip,
        config.compile,
        config.tta,
    )
    return runner, steps_per_epoch
