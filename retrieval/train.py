"""Train a registry architecture on labelled folders: `train(TrainConfig) -> TrainResult`, resumable."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.atomic import write_json
from retrieval.backbones import BackboneSpec, get_spec
from retrieval.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from retrieval.config import known_keys
from retrieval.device import Runtime, resolve_runtime
from retrieval.errors import BadImageError, CheckpointError, EmptyInputError, RetrieveError, first_line
from retrieval.images import Decoder, PILDecoder, Transform, load_tensor, scan
from retrieval.paths import user_path
from retrieval.preprocess import Preprocess

AUGMENTS = ("auto", "crop", "rrc", "none")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
VAL_SPLIT_NAMES = ("val", "validation", "test")
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
# Fields that `--resume` may change: where and how the run executes, never what it computes.
RESUME_OVERRIDES = ("device", "dtype", "workers", "compile", "cache_mb", "stop_after_epochs")
# What a None field becomes when the architecture's recipe (BackboneSpec.recipe) does not set it.
GENERAL_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "batch_size": 128,
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.1,
    "tta": False,
    "norm_bias_lr_scale": 1.0,
    "crop_pad": None,  # stays None: a 1/8 of the training side, known once the size is
}
# Fields added after runs were first saved: what those runs did (resume must rebuild the same optimiser).
LEGACY_DEFAULTS: dict[str, Any] = {"norm_bias_lr_scale": 1.0}
_GENERAL_LR = {"sgd": 0.1, "adamw": 2e-3}  # peak rate per 128 images
_GENERAL_WD = {"sgd": 5e-4, "adamw": 0.05}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `retrieve train`; every CLI flag maps onto one field."""

    data: Path | None  # labelled folder: <class>/*, or train/<class> + val|test/<class>; None with resume
    out: Path | None  # run directory (config, metrics, checkpoints, report); None with resume
    arch: str = "resnet18"  # registry name (see `retrieve backbones`)
    pretrained: str | None = None  # "imagenet" fine-tunes from torchvision weights; None = from scratch
    image_size: int | None = None  # training side in px; None = the architecture's (or weights') default
    channels: int | None = None  # 1 or 3; None = 1 when every image is greyscale, else 3
    # None in the fields below = the architecture's recipe (`BackboneSpec.recipe`), else GENERAL_DEFAULTS;
    # `with_recipe` fills them in, and config.json records the filled-in values.
    epochs: int | None = None  # 30
    batch_size: int | None = None  # 128
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, Nesterov) or "adamw"
    lr: float | None = None  # peak rate; 0.1 (sgd) / 2e-3 (adamw) per 128 images, /10 pretrained
    weight_decay: float | None = None  # 5e-4 (sgd) / 0.05 (adamw); never applied to norms or biases
    schedule: str | None = None  # "cosine" or "onecycle" (linear up, linear down), after a linear warm-up
    warmup_epochs: float | None = None  # 1.0; linear warm-up length (capped at a third of the run)
    label_smoothing: float | None = None  # 0.1
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    norm_bias_lr_scale: float | None = None  # 1.0; learning-rate multiple for the shifts of norm layers
    augment: str = "auto"  # "crop" (reflect-pad + random crop), "rrc" (random resized crop), "none"; auto:
    # crop up to 64 px (small images have no room to zoom), rrc above
    flip: bool = True  # random horizontal flips (turn off for digits and text)
    crop_pad: int | None = None  # crop augmentation: largest shift in px; None = size // 8 (4 px at 32)
    tta: bool | None = None  # False; validate on the mean logits of each image and its mirror (needs flip)
    val_fraction: float = 0.1  # held-out share per class when the folder has no val/test split
    seed: int = 0  # seeds the split, init, shuffling and augmentation: same seed, same run on one machine
    deterministic: bool = (
        False  # also force deterministic GPU kernels (slower); CPU runs are already repeatable
    )
    device: str = "auto"  # auto = CUDA > MPS > CPU
    dtype: str = "auto"  # autocast dtype; auto = bf16 where the hardware does it natively (incl. this CPU)
    compile: bool = False  # torch.compile the model (pays off for long GPU runs)
    workers: int | None = None  # decode threads / DataLoader processes; None = CPU count (max 8)
    cache_mb: int | None = None  # memory budget for decoded images; None = a quarter of available RAM;
    # over budget, images stream from disk through a DataLoader instead
    stop_after_epochs: int | None = None  # stop (resumably) after this many epochs of the schedule
    resume: Path | None = None  # a run directory (or its last.pt) to continue; other fields come from it
    overwrite: bool = False  # allow `out` to hold a previous run (its files are replaced)

    def __post_init__(self) -> None:
        if self.resume is None and (self.data is None or self.out is None):
            raise RetrieveError("Give a data folder and an output run directory, or --resume RUN_DIR.")
        if self.augment not in AUGMENTS:
            raise RetrieveError(
                f"Unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENTS)}."
            )
        if self.optimizer not in OPTIMIZERS:
            raise RetrieveError(
                f"Unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}."
            )
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise RetrieveError(f"Unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if self.pretrained not in (None, "imagenet"):
            raise RetrieveError(f"--pretrained takes 'imagenet' (got {self.pretrained!r}).")
        if self.channels not in (None, 1, 3):
            raise RetrieveError("--channels must be 1 or 3.")
        if (self.epochs is not None and self.epochs < 1) or (
            self.batch_size is not None and self.batch_size < 1
        ):
            raise RetrieveError("epochs and batch size must be at least 1.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise RetrieveError("--val-fraction must be in [0, 1).")
        if self.image_size is not None and self.image_size < 8:
            raise RetrieveError("--image-size must be at least 8.")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise RetrieveError("--label-smoothing must be in [0, 1).")
        if self.crop_pad is not None and self.crop_pad < 0:
            raise RetrieveError("--crop-pad must be 0 or more pixels.")
        if self.tta and not self.flip:
            raise RetrieveError("--tta averages each image with its mirror; it needs --flip.")
        if self.norm_bias_lr_scale is not None and self.norm_bias_lr_scale <= 0:
            raise RetrieveError("--norm-bias-lr-scale must be above 0.")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            raise RetrieveError("--stop-after-epochs must be at least 1.")
        # NaN passes every `<` test, so each bound is written as what must hold.
        checks = [
            ("--lr", self.lr, lambda v: 0 < v < math.inf, "a positive finite number"),
            (
                "--weight-decay",
                self.weight_decay,
                lambda v: 0 <= v < math.inf,
                "0 or a positive finite number",
            ),
            ("--warmup-epochs", self.warmup_epochs, lambda v: 0 <= v < math.inf, "0 or more epochs"),
            ("--grad-clip", self.grad_clip, lambda v: 0 < v < math.inf, "a positive finite norm"),
        ]
        for flag, value, ok, what in checks:
            if value is not None and not ok(value):
                raise RetrieveError(f"{flag} must be {what}, not {value}.")
        if not 0 <= self.seed < 2**63:
            raise RetrieveError(f"--seed must be in [0, 2**63), not {self.seed}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (paths as strings): written to config.json and into every checkpoint."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known_keys(cls, d)
        # A run saved before a field existed ran with that field's old behaviour, not today's recipe.
        d = {**LEGACY_DEFAULTS, **d}
        paths = {"data", "out", "resume"}
        return cls(**{k: (Path(v) if k in paths and v is not None else v) for k, v in d.items()})


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


class TrainReporter:
    """Progress callbacks; the library prints nothing itself. The CLI renders these with rich."""

    def message(self, text: str) -> None:
        """A note for the user (data found, device, fallbacks)."""

    def step(self, epoch: int, step: int, steps: int) -> None:
        """After each optimiser step (1-based `step` within 0-based `epoch`)."""

    def epoch(self, stats: EpochStats) -> None:
        """After each epoch's evaluation and checkpoints."""

    def close(self) -> None:
        """Training has ended (normally, by Ctrl-C or by an error): release any live display."""


# --------------------------------------------------------------------------------------------
# Data: discovery, split, decoding


@dataclass(frozen=True)
class Split:
    """Training and validation files (paths relative to the data root) with class indices."""

    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]
    problems: tuple[tuple[str, str], ...] = ()  # (relpath, reason) found while scanning

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "train": [list(t) for t in self.train],
            "val": [list(v) for v in self.val],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Split:
        return cls(
            tuple(d["classes"]),
            tuple((str(p), int(i)) for p, i in d["train"]),
            tuple((str(p), int(i)) for p, i in d["val"]),
        )


def _labelled(root: Path, prefix: str) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """class name -> relpaths (under the data root) for `root/<class>/**/*`."""
    entries, problems = scan(root)
    by_class: dict[str, list[str]] = {}
    problems = [(f"{prefix}{rel}", reason) for rel, reason in problems]
    for e in entries:
        cls_name, sep, _ = e.relpath.partition("/")
        if not sep:  # a file directly in the root has no class folder
            problems.append((f"{prefix}{e.relpath}", "not inside a class folder"))
            continue
        by_class.setdefault(cls_name, []).append(f"{prefix}{e.relpath}")
    empty = sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in by_class
    )
    problems += [(f"{prefix}{name}/", "class folder with no images: not a class") for name in empty]
    return by_class, problems


def discover(data: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0) -> Split:
    """Find classes and files: `data/train/<class>` + `data/val|validation|test/<class>` if present,
    else `data/<class>` with a seeded stratified split holding out `val_fraction` of each class."""
    root = user_path(data)
    if not root.is_dir():
        raise EmptyInputError(f"{root} is not a folder of labelled images (expected {root}/<class>/*.jpg).")
    val_root = next((root / n for n in VAL_SPLIT_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir():
        train_classes, problems = _labelled(root / "train", "train/")
    else:
        train_classes, problems = _labelled(root, "")
        val_root = None
    classes = tuple(sorted(train_classes))
    layout = f"expected {root}/<class>/*.jpg, or {root}/train/<class> + {root}/val/<class>"
    loose = sum(1 for _, reason in problems if reason == "not inside a class folder")
    if not classes and loose:
        raise EmptyInputError(
            f"{root}: its {loose} images are not inside class folders; the folder name is the label "
            f"({layout})."
        )
    if not classes:
        raise EmptyInputError(f"{root} holds no images ({layout}).")
    if len(classes) < 2:
        raise EmptyInputError(
            f"{root} has only one class ({classes[0]}); training a classifier needs at least two "
            f"class folders with images ({layout})."
        )
    index = {c: i for i, c in enumerate(classes)}
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    if val_root is not None:
        val_classes, val_problems = _labelled(val_root, f"{val_root.name}/")
        problems += val_problems
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise RetrieveError(
                f"{val_root} has classes that train/ lacks: {', '.join(unknown)}. "
                "Every validation class needs training images."
            )
        train = [(p, index[c]) for c in classes for p in train_classes[c]]
        val = [(p, index[c]) for c in classes for p in val_classes.get(c, [])]
    else:
        rng = np.random.default_rng(seed)
        for c in classes:
            paths = train_classes[c]
            order = rng.permutation(len(paths))
            n_val = 0
            if val_fraction > 0 and len(paths) >= 2:
                # Stratified: every class keeps at least one image on each side.
                n_val = min(len(paths) - 1, max(1, round(len(paths) * val_fraction)))
            held = set(order[:n_val].tolist())
            for i, p in enumerate(paths):
                (val if i in held else train).append((p, index[c]))
    return Split(classes, tuple(train), tuple(val), tuple(problems))


_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def all_greyscale(paths: Sequence[Path]) -> bool:
    """True when every file decodes to a single channel (header only, no pixel decoding)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as img:
                if img.mode not in _GREY_MODES:
                    return False
        except Exception:  # unreadable files are reported by the decoder; they do not decide this
            continue
    return True


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


# Below this many files, threads in this process; above, worker processes (see decode_to_memory),
# where a file that crashes the decoder is skipped instead of killing the run. CIFAR JPEGs on 2
# cores (2026-11-26): 300 files 0.11 s threads / 0.20 s processes, 1,000 0.35 / 0.29 s, 4,000
# 1.54 / 0.64 s; so processes from a few hundred files, where their start-up no longer shows.
PROCESS_DECODE_MIN = 512


def decode_to_memory(
    paths: Sequence[Path], transform: Transform, workers: int, *, decoder: Decoder | None = None
) -> tuple[torch.Tensor, np.ndarray, list[tuple[int, str]]]:
    """Decode every file once into uint8 [N, C, S, S] (S = transform's size).

    Returns (images, ok mask, problems as (position, reason)); a bad file leaves a zero image and
    ok=False. Small images cost ~300 us each, mostly Python in PIL's open path under the GIL, so
    threads do not scale: large sets are decoded by worker processes (60k CIFAR JPEGs took ~40 s
    with 16 threads on a 16-core machine), where a file that crashes the decoder is skipped too
    (`retrieval.images.decode_all`).
    """
    decoder = decoder or PILDecoder()
    pre = transform.pre
    out = torch.zeros(len(paths), pre.channels, pre.size, pre.size, dtype=torch.uint8)
    ok = np.ones(len(paths), dtype=bool)
    problems: dict[int, str] = {}
    if workers >= 2 and len(paths) >= PROCESS_DECODE_MIN:
        from retrieval.images import Batch, ImageFileEntry, decode_all

        # Each file's position stands in for its relative path: the rows say where it goes.
        entries = [ImageFileEntry(Path(p), str(i), "", 0, 0.0) for i, p in enumerate(paths)]

        def consume(batch: Batch) -> None:  # idempotent: decode_all may hand a batch over twice
            for j, row in enumerate(batch.rows):
                out[int(row["path"])] = batch.images[j]
            for row in batch.skipped:
                ok[int(row["path"])] = False
                problems[int(row["path"])] = row["reason"]

        batch = max(64, min(1024, len(paths) // (4 * workers)))
        decode_all(entries, transform, batch, workers, consume, decoder=decoder)
        return out, ok, sorted(problems.items())

    def one(i: int) -> None:
        try:
            out[i] = decoder.decode(paths[i], transform)[0]
        except BadImageError as exc:
            ok[i] = False
            problems[i] = str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(one, range(len(paths))):
            pass
    return out, ok, sorted(problems.items())


class _FileDataset(torch.utils.data.Dataset):
    """Streaming fallback: decodes one file per item (same transform as the in-memory cache)."""

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, transform: Transform) -> None:
        self.paths, self.labels, self.transform = list(paths), labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        try:
            return load_tensor(self.paths[i], self.transform)[0], int(self.labels[i])
        except BadImageError:
            return None  # dropped by _collate; the file was not in the decode cache either


def _collate(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [it for it in items if it is not None]
    if not items:
        return torch.zeros(0, 1, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class ImageSource:
    """Batches of uint8 [B, C, R, R] images and labels, from memory or streamed from disk."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        transform: Transform,
        workers: int,
        cache: bool,
        device: torch.device,
    ) -> None:
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.transform, self.workers, self.device = transform, workers, device
        self.paths = list(paths)
        self.cached = cache
        self.problems: list[tuple[Path, str]] = []
        self.images: torch.Tensor | None = None
        if cache and self.paths:
            images, ok, problems = decode_to_memory(self.paths, transform, workers)
            self.problems = [(self.paths[i], reason) for i, reason in problems]
            if not ok.all():  # drop undecodable files so they never reach the model
                keep = torch.from_numpy(np.flatnonzero(ok))
                images, self.labels = images[keep], self.labels[keep]
                self.paths = [self.paths[i] for i in keep.tolist()]
            if device.type == "cuda" and images.numel() < 0.25 * torch.cuda.mem_get_info(device)[0]:
                images = images.to(device)  # whole set on the GPU: batches never cross PCIe
            elif device.type == "cuda":
                images = images.pin_memory()
            self.images = images
        if device.type == "cuda" and self.images is not None:
            self.labels = self.labels.to(self.images.device)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, order: torch.Tensor, batch_size: int, skip: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels) on the device for consecutive slices of `order`."""
        starts = list(range(0, len(order), batch_size))[skip:]
        nb = self.device.type == "cuda"
        if self.images is not None:
            for s in starts:
                idx = order[s : s + batch_size].to(self.images.device)
                x, y = self.images[idx], self.labels[idx]
                yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)
            return
        dataset = _FileDataset(self.paths, self.labels, self.transform)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[order[s : s + batch_size].tolist() for s in starts],
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=nb,
        )
        for x, y in loader:
            if len(y):
                yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)


# --------------------------------------------------------------------------------------------
# Augmentation on batched tensors (pure functions: uint8 in, normalised float out)


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer index into [0, n) by mirror reflection without repeating the edge (F.pad 'reflect')."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def _normalise_nhwc(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float, normalised, returned as [B, C, H, W] in channels_last memory."""
    return (x.float() * scale + shift).permute(0, 3, 1, 2)


def crop_flip(x: torch.Tensor, size: int, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `pad`, take a random `size` crop, flip half: one gather on uint8 [B, C, R, R].

    Returns uint8 [B, size, size, C] (NHWC). With pad=0 and R == size it is a flip only. The crop
    offsets come from `gen` (a CPU generator) so runs repeat exactly on any device.
    """
    b, _, r, _ = x.shape
    lo = (r - size) // 2 - pad  # centre crop shifted by up to `pad` either way
    ty = torch.randint(0, 2 * pad + 1, (b,), generator=gen) + lo
    tx = torch.randint(0, 2 * pad + 1, (b,), generator=gen) + lo
    flips = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    ar = torch.arange(size)
    rows = _reflect(ty[:, None] + ar, r)
    cols = _reflect(tx[:, None] + ar, r)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    bi = torch.arange(b, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, size: int, n: int) -> torch.Tensor:
    """[B, size, n] weights that resample source span [start, start+length) of n pixels to `size`
    pixels with a triangle (bilinear) filter widened when shrinking, i.e. antialiased like PIL.

    Built on `start`'s device: at 224 px a batch of 256 needs 2 x 15M weights, which on the CPU
    made the GPU step 6x slower than a bare one (bench/train.py speed)."""
    dev = start.device
    scale = length / size
    centre = start[:, None] + (torch.arange(size, device=dev) + 0.5)[None, :] * scale[:, None]
    support = scale.clamp(min=1.0)[:, None, None]
    src = torch.arange(n, device=dev) + 0.5
    w = (1 - (src[None, None, :] - centre[:, :, None]).abs() / support).clamp(min=0)
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    flip: bool,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random resized crop + flip of uint8 [B, C, R, R] to float [B, C, size, size] (0-255 range).

    Each image gets its own crop box; the resize is two batched matmuls with per-image separable
    resampling matrices, so the whole batch is augmented in one pass with no Python loop.
    The default scale floor is 0.25 rather than torchvision's 0.08: user datasets are small and
    objects are usually not centred the way ImageNet's are.
    """
    b, _, r, _ = x.shape
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = log_ratio.exp()
    w = (r * (area * aspect).sqrt()).clamp(1, r)
    h = (r * (area / aspect).sqrt()).clamp(1, r)
    x0 = torch.rand(b, generator=gen) * (r - w)
    y0 = torch.rand(b, generator=gen) * (r - h)
    # Random draws stay on the CPU generator (same crops on any device); only [B] vectors move.
    flips = torch.rand(b, generator=gen) < 0.5 if flip else None
    dev = x.device
    my = _resample_matrix(y0.to(dev), h.to(dev), size, r)
    mx = _resample_matrix(x0.to(dev), w.to(dev), size, r)
    if flips is not None:
        mx = torch.where(flips.to(dev)[:, None, None], mx.flip(1), mx)
    return my[:, None] @ x.float() @ mx[:, None].transpose(-1, -2)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, C, R, R] -> the central [B, C, size, size] (what Transform does at index time)."""
    r = x.shape[-1]
    o = (r - size) // 2
    return x[:, :, o : o + size, o : o + size]


@dataclass(frozen=True)
class Augment:
    """Batched augmentation + normalisation: uint8 [B, C, R, R] -> float [B, C, S, S] for the model."""

    mode: str  # "crop", "rrc" or "none"
    size: int  # S, the network's input side
    pad: int  # crop mode: maximum shift in px
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        std = torch.tensor(self.std, device=device)
        return 1.0 / (255.0 * std), -torch.tensor(self.mean, device=device) / std

    def train(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        scale, shift = self._affine(x.device)
        if self.mode == "rrc":
            out = random_resized_crop(x, self.size, self.flip, gen)
            out = out * scale[:, None, None] + shift[:, None, None]
            return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out
        pad = self.pad if self.mode == "crop" else 0
        out = _normalise_nhwc(crop_flip(x, self.size, pad, self.flip, gen), scale, shift)
        return out if self.channels_last else out.contiguous()

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._affine(x.device)
        out = _normalise_nhwc(centre_crop(x, self.size).permute(0, 2, 3, 1), scale, shift)
        return out if self.channels_last else out.contiguous()


# --------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def trainable_archs() -> list[str]:
    """Registry names that `retrieve train --arch` accepts (everything but the pixel baseline)."""
    from retrieval.backbones import list_backbones

    return [n for n in list_backbones() if get_spec(n).builder is not None]


def build_model(
    spec: BackboneSpec, num_classes: int, in_channels: int, pretrained: str | None
) -> tuple[nn.Module, Preprocess | None]:
    """A fresh or ImageNet-initialised classifier; returns it with the preprocessing its weights need
    (None from scratch, where normalisation is measured on the training images)."""
    from retrieval.models import replace_head, replace_input_channels

    if spec.builder is None:
        raise RetrieveError(
            f"{spec.name} has nothing to train; choose one of {', '.join(trainable_archs())}."
        )
    if pretrained is None:
        return spec.builder(num_classes, in_channels), None
    if spec.weights is None:
        raise RetrieveError(
            f"{spec.name} has no ImageNet weights to fine-tune; drop --pretrained to train it from scratch."
        )
    from retrieval.backbones import _load_imagenet, imagenet_preprocess
    from retrieval.errors import WeightsUnavailableError

    try:
        model = _load_imagenet(spec)
    except WeightsUnavailableError as exc:
        # The registry's message ends with index flags; say what applies to training instead.
        first = str(exc).split(", or use:")[0]
        raise WeightsUnavailableError(
            f"{first}.\n  Or train from scratch: drop --pretrained (small images: --arch resnet8_small)."
        ) from None
    pre = imagenet_preprocess(spec)
    if getattr(model, "transform_input", False):
        # torchvision's ImageNet GoogLeNet re-normalises its input internally; the checkpoint is
        # rebuilt without that flag, so fold it into the recorded normalisation instead (equal maths).
        model.transform_input = False
        pre = replace(pre, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model = replace_head(model, num_classes)
    if in_channels != 3:
        model = replace_input_channels(model, in_channels)
        # One grey channel stands for R=G=B: its statistics are the average of the three.
        m, s = sum(pre.mean) / 3, sum(pre.std) / 3
        pre = replace(pre, mean=(m,) * 3, std=(s,) * 3, channels=in_channels)
    return model, pre


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, norm_bias_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Decay only weight matrices and kernels; norm scales and biases (1-d) are not regularised.

    With `norm_bias_lr_scale` != 1 the shifts of the normalisation layers get their own group at
    that multiple of the rate (airbench's 64x: with fixed BN scales, the shifts are each channel's
    only threshold and move far faster than the 1/fan-in-sized weights they sit on).
    """
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_bias_ids = set()
    if norm_bias_lr_scale != 1.0:
        norm_bias_ids = {
            id(m.bias)
            for m in model.modules()
            if isinstance(m, norms) and getattr(m, "bias", None) is not None
        }
    decay, no_decay, norm_bias = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if id(p) in norm_bias_ids:
                norm_bias.append(p)
            else:
                (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    if norm_bias_ids:  # only then: a run without it keeps the two groups older checkpoints hold
        groups.append({"params": norm_bias, "weight_decay": 0.0, "lr": lr * norm_bias_lr_scale})
    return groups


def with_recipe(config: TrainConfig) -> TrainConfig:
    """`config` with every None training default filled in: from the architecture's recipe where it
    has one, else GENERAL_DEFAULTS. Fields the user set are kept; applying it twice changes nothing."""
    recipe = dict(get_spec(config.arch).recipe)
    fill = {k: recipe.get(k, v) for k, v in GENERAL_DEFAULTS.items() if getattr(config, k) is None}
    if config.tta is None and not config.flip:
        fill["tta"] = False  # the recipe's flip TTA presumes flip training; --no-flip turns it off
    c = replace(config, **fill)
    assert c.batch_size is not None
    same_optimizer = c.optimizer == recipe.get("optimizer", "sgd")
    lr, wd = c.lr, c.weight_decay
    if lr is None:
        if same_optimizer and "lr" in recipe:
            lr = recipe["lr"] * c.batch_size / recipe.get("batch_size", 128)
        else:
            lr = _GENERAL_LR[c.optimizer] * c.batch_size / 128  # linear scaling rule (Goyal et al.)
        if c.pretrained:
            lr /= 10  # fine-tuning: keep the ImageNet features, adapt them gently
    if wd is None:
        wd = (
            recipe["weight_decay"]
            if same_optimizer and "weight_decay" in recipe
            else _GENERAL_WD[c.optimizer]
        )
    return replace(c, lr=lr, weight_decay=wd)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    c = with_recipe(config)
    assert c.lr is not None and c.weight_decay is not None
    assert c.norm_bias_lr_scale is not None
    groups = param_groups(model, c.weight_decay, c.lr, c.norm_bias_lr_scale)
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.999))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak rate at optimiser step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "onecycle":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    c = with_recipe(config)
    assert c.epochs is not None and c.warmup_epochs is not None and c.schedule is not None
    total = c.epochs * steps_per_epoch
    warmup = min(round(c.warmup_epochs * steps_per_epoch), total // 3)
    schedule = c.schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule))


def _step_seed(seed: int, epoch: int, step: int) -> int:
    # Every (epoch, step) gets its own stream: a resumed run draws exactly the same crops.
    return ((seed * 1_000_003 + epoch) * 1_000_033 + step) % (2**63)


class StepRunner:
    """One optimiser step: augment, forward under autocast, backward, clip, step, schedule.

    Shared by `train` and by the per-architecture test, so both exercise the same code.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        runtime: Runtime,
        augment: Augment,
        label_smoothing: float = 0.0,
        grad_clip: float | None = None,
        compile: bool = False,
        tta: bool = False,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.tta = tta
        self.runtime, self.augment = runtime, augment
        self.grad_clip = grad_clip
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.scaler = torch.amp.GradScaler(
            runtime.device.type, enabled=runtime.autocast_dtype == torch.float16
        )
        self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compile else model

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (summed loss, number correct) as 0-d tensors, left on the device (no sync)."""
        inputs = self.augment.train(x, gen)
        with self.runtime.autocast():
            logits = self.forward(inputs)
            loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
        return loss.detach() * len(y), correct

    @torch.no_grad()
    def evaluate(
        self, source: ImageSource, batch_size: int, num_classes: int
    ) -> tuple[float, float, np.ndarray]:
        """(mean loss, accuracy, confusion matrix [true, predicted]) over a whole source."""
        self.model.eval()
        dev = self.runtime.device
        loss_sum = torch.zeros((), device=dev)
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=dev)
        order = torch.arange(len(source))
        try:
            for x, y in source.batches(order, batch_size):
                inputs = self.augment.eval(x)
                with self.runtime.autocast():
                    logits = self.forward(inputs).float()
                    if self.tta:  # the mirror is as likely as the original under flip training
                        logits = (logits + self.forward(inputs.flip(-1)).float()) / 2
                loss_sum += F.cross_entropy(logits, y, reduction="sum")
                confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2)
        finally:
            self.model.train()
        conf = confusion.view(num_classes, num_classes).cpu().numpy()
        n = max(1, int(conf.sum()))
        return float(loss_sum) / n, float(np.trace(conf)) / n, conf


# --------------------------------------------------------------------------------------------
# Run directory: checkpoints, metrics, report


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a different GPU count: the CPU state is what matters
            torch.cuda.set_rng_state_all(state["cuda"])


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


# --------------------------------------------------------------------------------------------
# The loop


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


def _holds_other_files(run_dir: Path) -> bool:
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


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; a torn line (a kill during the append) sorts last, dropped."""
    try:
        return float(json.loads(line)["epoch"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return math.inf


def _resume_config(config: TrainConfig) -> tuple[TrainConfig, Checkpoint, Path]:
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
        f"--{k.replace('_', '-')} {getattr(config, k)} (the run has {ran_with(k)})"
        for k, default in fixed.items()
        if getattr(config, k) != default and getattr(config, k) != ran_with(k)
    ]
    if conflicts:
        raise RetrieveError(
            f"--resume continues {ckpt_path.parent} as it was started; it cannot change "
            f"{'; '.join(conflicts)}. Start a new run (--out) to train differently."
        )
    overrides = {k: getattr(config, k) for k in RESUME_OVERRIDES}
    if config.data is not None:
        overrides["data"] = config.data  # the images may have moved
    run_dir = ckpt_path.parent
    return replace(saved_cfg, **overrides, out=run_dir, resume=config.resume, overwrite=False), ckpt, run_dir


def _measure_stats(
    images: torch.Tensor | None, source_paths: Sequence[Path], transform: Transform
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (0-1 scale) of the training images: at most 4096 of them."""
    if images is not None:
        sample = images[:: max(1, len(images) // 4096)]
    else:
        idx = np.linspace(0, len(source_paths) - 1, min(512, len(source_paths))).astype(int)
        sample = torch.stack([load_tensor(source_paths[i], transform)[0] for i in idx])
    x = sample.float().div_(255).transpose(0, 1).reshape(sample.shape[1], -1)
    mean, std = x.mean(1), x.std(1).clamp(min=1e-3)
    if len(mean) == 1:
        return (float(mean[0]),) * 3, (float(std[0]),) * 3
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def train(config: TrainConfig, reporter: TrainReporter | None = None) -> TrainResult:
    """Train `config.arch` on `config.data`; write checkpoints, metrics and a report to `config.out`.

    Ctrl-C stops after the current step, saves last.pt (mid-epoch state included) and returns with
    `interrupted=True`; `TrainConfig(resume=run_dir)` then continues exactly where it stopped.
    """
    t_start = time.perf_counter()
    rep = reporter or TrainReporter()
    ckpt: Checkpoint | None = None
    if config.resume is not None:
        config, ckpt, run_dir = _resume_config(config)
    else:
        assert config.out is not None
        run_dir = user_path(config.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise RetrieveError(f"--out {run_dir} is a file; give a folder for the run.")
        # A run killed before its first epoch ended left no state worth keeping: start it afresh.
        has_run = (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists()
        if has_run and not config.overwrite:
            raise RetrieveError(
                f"{run_dir} already holds a training run. Continue it with --resume {run_dir}, "
                "choose another --out, or pass --overwrite."
            )
        if not has_run and not config.overwrite and _holds_other_files(run_dir):
            raise RetrieveError(
                f"{run_dir} holds files that are not a `retrieve train` run; a run writes config.json, "
                "report.txt and more there. Choose a new or empty --out, or pass --overwrite."
            )
    assert config.data is not None
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
    runtime = resolve_runtime(config.device, config.dtype)
    data = user_path(config.data)

    # ---- data
    split_file = run_dir / "split.json"
    if ckpt is not None and not data.is_dir():
        raise EmptyInputError(
            f"The run's data folder {data} is not there any more; if it moved, give its new place: "
            f"retrieve train NEW_FOLDER --resume {run_dir}"
        )
    if ckpt is not None and split_file.is_file():
        try:
            split = Split.from_dict(json.loads(split_file.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{split_file} is damaged ({type(exc).__name__}); without it the run's train/validation "
                "split is unknown and the run cannot be resumed."
            ) from None
    else:
        split = discover(data, config.val_fraction, config.seed)
    if ckpt is not None and tuple(ckpt.classes) != split.classes:
        raise CheckpointError(
            f"The classes in {data} ({', '.join(split.classes)}) differ from the run's "
            f"({', '.join(ckpt.classes)}); resume needs the same data."
        )
    classes, k = split.classes, len(split.classes)
    train_paths = [data / p for p, _ in split.train]
    val_paths = [data / p for p, _ in split.val]
    if ckpt is not None:
        channels = ckpt.in_channels
    elif config.channels is not None:
        channels = config.channels
    else:
        channels = 1 if all_greyscale(train_paths + val_paths) else 3
        if channels == 1:
            rep.message("every image is greyscale: training on 1 channel (override with --channels 3)")

    # Seeded before building, so --seed fixes the initial weights (and a new head when fine-tuning).
    torch.manual_seed(config.seed)
    if ckpt is None:
        model, weights_pre = build_model(spec, k, channels, config.pretrained)
    else:
        model, weights_pre = spec.builder(k, channels), None
    base = weights_pre or spec.preprocess
    size = config.image_size or base.size
    if spec.name == "lenet" and size != 32:
        raise RetrieveError("LeNet-5 takes 32x32 inputs; use --image-size 32 (smaller images are upscaled).")
    if config.crop_pad is not None and config.crop_pad >= size:
        raise RetrieveError(f"--crop-pad {config.crop_pad} must be smaller than the {size} px training side.")
    mode = config.augment if config.augment != "auto" else ("crop" if size <= 64 else "rrc")
    # rrc zooms into a slightly larger stored image; evaluation centre-crops it (the 224/256 rule).
    stored = round(size / 0.875) if mode == "rrc" else size
    decode_pre = Preprocess(size=stored, resize=stored, channels=channels)
    transform = Transform(decode_pre)
    workers = config.workers if config.workers is not None else min(8, os.cpu_count() or 1)
    n_images = len(train_paths) + len(val_paths)
    need = n_images * channels * stored * stored
    budget = (_available_memory() // 4) if config.cache_mb is None else config.cache_mb << 20
    cache = need <= budget
    rep.message(
        f"{len(train_paths)} training and {len(val_paths)} validation files in {k} classes; "
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
            mean, std = _measure_stats(train_src.images, train_src.paths, transform)
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

    # ---- model, optimiser, schedule
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _probe(model, spec.name, channels, size, runtime)
    if ckpt is None and config.pretrained is None and hasattr(model, "init_from_data"):
        # Data-dependent init (AirNet's whitened stem); a resumed run restores it from the checkpoint.
        _init_from_data(model, train_src, augment, config.seed)

    bs = config.batch_size
    n_train = len(train_src)
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

    start_epoch, start_step = 0, 0
    best_acc: float | None = None
    best_epoch = 0
    best_conf: np.ndarray | None = None
    partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if ckpt is not None:
        state = ckpt.extra["resume"]
        try:
            model.load_state_dict(ckpt.state_dict)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            runner.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{config.resume}: the saved state does not fit this run ({first_line(exc)})."
            ) from None
        _set_rng_state(state["rng"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        best_acc = state.get("best_val_acc")
        best_epoch = int(state.get("best_epoch", 0))
        if state.get("best_confusion") is not None:
            best_conf = state["best_confusion"].numpy()
        partial = dict(state.get("partial", partial))
        rep.message(
            f"resuming {run_dir} at epoch {start_epoch + 1}"
            + (f", step {start_step + 1}" if start_step else "")
        )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Everything a previous run in this folder wrote: a crash of the new one must not leave the
        # old last.pt (or its skip list) to be resumed or read as this run's.
        for name in (*RUN_FILES, "split.json"):
            (run_dir / name).unlink(missing_ok=True)
        write_json(split_file, split.to_dict())
    info = {
        "config": config.to_dict(),
        "classes": list(classes),
        "train_images": n_train,
        "val_images": len(val_src),
        "preprocess": pre.to_dict(),
        "augment": {"mode": mode, "pad": augment.pad, "flip": augment.flip},
        "runtime": runtime.describe(),
        "cached_in_memory": cache,
        "steps_per_epoch": steps_per_epoch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    write_json(run_dir / "config.json", info)
    if problems:
        (run_dir / "skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in problems))
        rep.message(f"{len(problems)} files skipped (see {run_dir / 'skipped.txt'})")
    rep.message(
        f"{spec.name} ({info['parameters'] / 1e6:.2f}M parameters) on {runtime.describe()}, {mode} augmentation"
    )

    # metrics.jsonl keeps only epochs the checkpoint has seen (a kill between the two files is harmless).
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        kept = [ln for ln in metrics_file.read_text().splitlines() if _epoch_of(ln) <= start_epoch]
        metrics_file.write_text("".join(ln + "\n" for ln in kept))

    def checkpoint(epoch: int, step: int, part: dict[str, Any]) -> Checkpoint:
        state = {
            "epoch": epoch,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": runner.scaler.state_dict(),
            "rng": _rng_state(),
            "best_val_acc": best_acc,
            "best_epoch": best_epoch,
            "best_confusion": None if best_conf is None else torch.from_numpy(best_conf),
            "partial": part,
        }
        return Checkpoint(
            arch=spec.name,
            state_dict={key: v.detach().cpu() for key, v in model.state_dict().items()},
            classes=classes,
            preprocess=pre,
            num_classes=k,
            in_channels=channels,
            extra={"config": config.to_dict(), "resume": state, "epoch": epoch},
        )

    history: list[EpochStats] = []
    interrupted = False
    completed = start_epoch
    if start_epoch >= config.epochs:
        rep.message(f"{run_dir} has already finished all {config.epochs} epochs: nothing to train")
    session_start = time.perf_counter()
    epoch_times: list[float] = []
    end_epoch = config.epochs
    if config.stop_after_epochs is not None:
        end_epoch = min(end_epoch, config.stop_after_epochs)
    model.train()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, end_epoch):
            t_epoch = time.perf_counter()
            shuffle = torch.Generator().manual_seed(_step_seed(config.seed, epoch, -1))
            order = torch.randperm(n_train, generator=shuffle)[: steps_per_epoch * bs]
            skip = start_step if epoch == start_epoch else 0
            # Sums from the part of this epoch run before an interruption (zero otherwise).
            carried = partial if skip else {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            loss_sum = torch.zeros((), device=runtime.device)
            correct = torch.zeros((), dtype=torch.long, device=runtime.device)
            seen = 0
            gen = torch.Generator()
            step = skip
            for x, y in train_src.batches(order, bs, skip):
                gen.manual_seed(_step_seed(config.seed, epoch, step))
                loss, corr = runner(x, y, gen)
                loss_sum += loss
                correct += corr
                seen += len(y)
                step += 1
                rep.step(epoch, step, steps_per_epoch)
                if stop.set and step < steps_per_epoch:
                    part = {
                        "loss": float(carried["loss"]) + float(loss_sum),
                        "correct": int(carried["correct"]) + int(correct),
                        "seen": int(carried["seen"]) + seen,
                        "seconds": float(carried["seconds"]) + time.perf_counter() - t_epoch,
                    }
                    save_checkpoint(checkpoint(epoch, step, part), run_dir / "last.pt")
                    interrupted = True
                    break
            if interrupted:
                break
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            session_seconds = time.perf_counter() - t_epoch
            total_seen = int(carried["seen"]) + seen
            train_loss = (float(carried["loss"]) + float(loss_sum)) / max(1, total_seen)
            if not math.isfinite(train_loss):
                # Checked before saving: last.pt and best.pt keep the last finite epoch.
                raise RetrieveError(
                    f"Training diverged: the loss became {train_loss} in epoch {epoch + 1}. Start a new "
                    f"run with a lower --lr (this one used {config.lr:g}) or with --grad-clip 1."
                )
            train_acc = (int(carried["correct"]) + int(correct)) / max(1, total_seen)
            val_loss = val_acc = None
            conf = None
            if len(val_src):
                val_loss, val_acc, conf = runner.evaluate(val_src, 2 * bs, k)
            # Without a validation set every epoch is "best": best.pt is then the latest model.
            is_best = val_acc is None or best_acc is None or val_acc > best_acc
            if is_best:
                best_acc, best_epoch, best_conf = val_acc, epoch + 1, conf
            ck = checkpoint(epoch + 1, 0, {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})
            save_checkpoint(ck, run_dir / "last.pt")
            if is_best:
                save_checkpoint(ck, run_dir / "best.pt")
            completed = epoch + 1
            epoch_seconds = time.perf_counter() - t_epoch
            epoch_times.append(epoch_seconds)
            stats = EpochStats(
                epoch=completed,
                epochs=config.epochs,
                train_loss=train_loss,
                train_acc=train_acc,
                val_loss=val_loss,
                val_acc=val_acc,
                lr=float(scheduler.get_last_lr()[0]),
                images_per_s=seen / max(1e-9, session_seconds),
                train_seconds=float(carried["seconds"]) + session_seconds,
                epoch_seconds=epoch_seconds,
                elapsed=time.perf_counter() - session_start,
                eta_seconds=(config.epochs - completed) * float(np.mean(epoch_times)),
                best=is_best,
            )
            with metrics_file.open("a") as fh:
                fh.write(json.dumps(asdict(stats)) + "\n")
            history.append(stats)
            rep.epoch(stats)
            if stop.set:
                interrupted = completed < config.epochs
                break

    summary = {
        "arch": spec.name,
        "classes": len(classes),
        "epochs_completed": completed,
        "epochs": config.epochs,
        "best_epoch": best_epoch,
        "best_val_accuracy": best_acc,
        "train_images": n_train,
        "val_images": len(val_src),
        "finished": completed >= config.epochs,
    }
    if completed > 0 and not interrupted:
        write_report(run_dir, classes, best_conf, summary)
    return TrainResult(
        run_dir=run_dir,
        best_checkpoint=run_dir / "best.pt",
        last_checkpoint=run_dir / "last.pt",
        classes=classes,
        epochs_completed=completed,
        best_epoch=best_epoch,
        best_val_acc=best_acc,
        history=tuple(history),
        interrupted=interrupted,
        preprocess=pre,
        seconds=time.perf_counter() - t_start,
        finished=completed >= config.epochs,
    )


def _init_from_data(
    model: nn.Module, source: ImageSource, augment: Augment, seed: int, n: int = 5000
) -> None:
    """Hand `model.init_from_data` up to `n` seeded training images, normalised as for evaluation."""
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
    chunks = [x for x, _ in source.batches(order, 500)]
    x = augment.eval(torch.cat(chunks))
    model.init_from_data(x)  # type: ignore[operator]


def _probe(model: nn.Module, name: str, channels: int, size: int, runtime: Runtime) -> None:
    """Fail before training when the input is too small for the network (e.g. AlexNet under ~63 px)."""
    model.eval()
    try:
        with torch.no_grad(), runtime.autocast():
            model(torch.zeros(2, channels, size, size, device=runtime.device))
    except RuntimeError as exc:
        raise RetrieveError(
            f"{name} cannot take {size}x{size} inputs ({first_line(exc, 160)}); use a larger --image-size."
        ) from None
    finally:
        model.train()


__all__ = [
    "Augment",
    "EpochStats",
    "Split",
    "StepRunner",
    "TrainConfig",
    "TrainReporter",
    "TrainResult",
    "build_model",
    "discover",
    "make_optimizer",
    "make_scheduler",
    "train",
    "trainable_archs",
]
