"""Batched feature extraction: a DataLoader that never dies on a bad file, and the model loop."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.backbones import Backbone
from retrieval.device import Runtime
from retrieval.errors import BadImageError
from retrieval.images import ImageFileEntry, Transform, load_tensor
from retrieval.paths import user_path


@dataclass
class Batch:
    """What a loader worker hands over: decoded images plus metadata, and the files that failed."""

    images: torch.Tensor  # uint8 [B, C, H, W]
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)


class ImageDataset(Dataset):
    """Decode + resize files in loader workers; a failure becomes a ledger entry, not an exception."""

    def __init__(self, entries: Sequence[ImageFileEntry], transform: Transform) -> None:
        self.entries, self.transform = entries, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        e = self.entries[i]
        row = {"path": e.relpath, "label": e.label, "bytes": e.size, "mtime": e.mtime, "ctime": e.ctime}
        try:
            tensor, width, height = load_tensor(e.path, self.transform)
        except BadImageError as exc:
            return None, {**row, "reason": str(exc)}
        return tensor, {**row, "width": width, "height": height}


def collate(items: list[tuple[torch.Tensor | None, dict[str, Any]]]) -> Batch:
    good = [(t, r) for t, r in items if t is not None]
    skipped = [r for t, r in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else torch.zeros(0, dtype=torch.uint8)
    return Batch(images, [r for _, r in good], skipped)


def default_workers(runtime: Runtime) -> int:
    """Loader processes: on GPU decode is the bottleneck, so all cores but one; on CPU one worker
    decodes ahead while the model uses the cores (measured best on 2 cores, bench/RESULTS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1) if runtime.is_gpu else 1


def default_batch_size(runtime: Runtime) -> int:
    return 256 if runtime.is_gpu else 32


def prepare_model(backbone: Backbone, runtime: Runtime) -> Backbone:
    if runtime.device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
    backbone = backbone.eval().to(runtime.device)
    if runtime.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


@torch.inference_mode()
def forward(
    backbone: Backbone, runtime: Runtime, transform: Transform, images: torch.Tensor, tta: bool = False
) -> np.ndarray:
    """uint8 batch -> float32 numpy vectors; normalisation happens on the device (4x less to copy).

    `tta`: the mean of each image's and its mirror's features, so that an image and its mirror
    embed alike (what flip-trained networks already nearly do; the mean removes the rest).
    """
    x = images.to(runtime.device, non_blocking=True)
    x = transform.normalize(x)
    if runtime.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        out = backbone(x).float()
        if tta:
            out = (out + backbone(x.flip(-1)).float()) / 2
    return out.cpu().numpy()


def iter_batches(
    entries: Sequence[ImageFileEntry],
    transform: Transform,
    runtime: Runtime,
    batch_size: int,
    workers: int,
) -> Iterator[Batch]:
    """Decoded batches in order; workers prefetch while the model runs."""
    loader = DataLoader(
        ImageDataset(entries, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=runtime.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    yield from loader


def embed_files(
    backbone: Backbone,
    runtime: Runtime,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    tta: bool = False,
) -> np.ndarray:
    """Embed a few files in this process (queries); a bad file raises BadImageError naming it."""
    transform = Transform(backbone.preprocess)
    out = []
    for start in range(0, len(paths), batch_size):
        tensors = []
        for p in paths[start : start + batch_size]:
            try:
                tensors.append(load_tensor(user_path(p), transform)[0])
            except BadImageError as exc:
                raise BadImageError(f"{p}: {exc}") from None
            except FileNotFoundError:
                raise BadImageError(f"{p}: no such file") from None
        out.append(forward(backbone, runtime, transform, torch.stack(tensors), tta))
    return np.concatenate(out) if out else np.zeros((0, backbone.dim), np.float32)
