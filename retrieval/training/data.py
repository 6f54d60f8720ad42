"""Training data: labelled folders into a train/validation split, decoded once or streamed in batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import BadImageError, EmptyInputError, RetrieveError
from retrieval.images import Decoder, PILDecoder, Transform, load_tensor, scan
from retrieval.paths import user_path

VAL_SPLIT_NAMES = ("val", "validation", "test")


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


def available_memory() -> int:
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


def measure_stats(
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
