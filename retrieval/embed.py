"""Batched feature extraction: a DataLoader that never dies on a bad file, and the model loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval import errors
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


def file_row(e: ImageFileEntry) -> dict[str, Any]:
    """The metadata every row has, read or skipped: what the resume key compares."""
    return {"path": e.relpath, "label": e.label, "bytes": e.size, "mtime": e.mtime, "ctime": e.ctime}


class ImageDataset(Dataset):
    """Decode + resize files in loader workers; a failure becomes a ledger entry, not an exception."""

    def __init__(self, entries: Sequence[ImageFileEntry], transform: Transform) -> None:
        self.entries, self.transform = entries, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        e = self.entries[i]
        row = file_row(e)
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


def _decode_in_process(entries: Sequence[ImageFileEntry], transform: Transform, out: list[Batch]) -> bool:
    """Append one batch per file, decoded in order by one process; False if that process died."""
    # One file asked for at a time (prefetch 1): the process holds at most the next file.
    loader = DataLoader(
        ImageDataset(entries, transform), batch_size=1, num_workers=1, collate_fn=collate, prefetch_factor=1
    )
    it = iter(loader)
    try:
        for batch in it:
            out.append(batch)
        return True
    except RuntimeError as exc:
        if not worker_died(exc):
            raise
        return False
    finally:
        del it  # stops and reaps the process now


# Batches each loader process decodes ahead of the model.
PREFETCH = 4


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
        prefetch_factor=PREFETCH if workers else None,
        persistent_workers=False,
    )
    yield from loader


def worker_died(exc: BaseException) -> bool:
    """A DataLoader process died (a signal, or a nonzero exit) rather than a Python error in it.

    DataLoader says so in two wordings, both starting alike: from its next batch ("exited
    unexpectedly") and from its SIGCHLD handler ("is killed by signal: Segmentation fault").
    """
    return isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker (pid")


def decode_all(
    entries: Sequence[ImageFileEntry],
    transform: Transform,
    runtime: Runtime,
    batch_size: int,
    workers: int,
    consume: Callable[[Batch], None],
    *,
    wrap: Callable[[Iterator[Batch]], Iterator[Batch]] = lambda it: it,
    warn: Callable[[str], None] = lambda message: None,
) -> None:
    """Hand every file to `consume` once, in order, in batches; a decoder crash costs one file.

    A hostile or damaged file can crash the C decoders (libjpeg, libpng, libtiff, libwebp) and
    kill the loader process that opened it, which no `except` in that process can stop. Without
    this, every re-run would meet the same file and die at the same place. DataLoader reports the
    death from its next batch or from its SIGCHLD handler, and the handler can raise anywhere in
    the main thread, inside `consume` too: so the retry wraps `consume`, which must tolerate a
    batch handed over again after it was interrupted (the index's staging keeps the later copy).
    The files the dead loader may have held are then decoded one at a time in a fresh process;
    a file that kills that one is handed over as skipped with the reason, and the fast loader
    resumes after them. `wrap` sees the batch iterator (to time it). In-process decoding
    (`workers=0`) has no process to lose, and so no protection.
    """
    pos = 0
    while pos < len(entries):
        stream = iter_batches(entries[pos:], transform, runtime, batch_size, workers)
        try:
            for batch in wrap(stream):
                consume(batch)
                pos += len(batch.rows) + len(batch.skipped)
            return
        except RuntimeError as exc:
            if workers == 0 or not worker_died(exc):
                raise
            cause = errors.first_line(exc).rstrip(" .")
        finally:
            stream.close()  # the loader's other processes stop now, not at garbage collection
        # Everything the dead loader had asked its processes for: its prefetch, plus one batch.
        end = min(len(entries), pos + batch_size * (PREFETCH * workers + 1))
        warn(
            f"a decoding process died ({cause}); reading the {end - pos} files it held one at a "
            "time to find any that crash it"
        )
        for start in range(pos, end, batch_size):
            # One batch at a time, so that memory stays one batch whatever the prefetch was.
            batch = _isolate(entries[start : min(end, start + batch_size)], transform)
            consume(batch)
            pos = start + len(batch.rows) + len(batch.skipped)


def _isolate(entries: Sequence[ImageFileEntry], transform: Transform) -> Batch:
    """Decode files one at a time in one process; a file whose decoding kills it is skipped."""
    done: list[Batch] = []  # one per file; a single append each, so a signal cannot split the count
    while len(done) < len(entries):
        if _decode_in_process(entries[len(done) :], transform, done):
            continue
        # The process died while `done` stood here; but the death may have been reported before
        # the last good batch reached us. Only a file that kills a process of its own is blamed.
        solo: list[Batch] = []
        if _decode_in_process(entries[len(done) : len(done) + 1], transform, solo):
            done.extend(solo)
        else:
            row = {**file_row(entries[len(done)]), "reason": "crashed the image decoder (its process died)"}
            done.append(Batch(torch.zeros(0, dtype=torch.uint8), [], [row]))
    # One batch for the model, made after every loader is gone: `consume` cannot be interrupted.
    good = [b.images for b in done if b.rows]
    return Batch(
        torch.cat(good) if good else torch.zeros(0, dtype=torch.uint8),
        [r for b in done for r in b.rows],
        [r for b in done for r in b.skipped],
    )


def embed_files(
    backbone: Backbone,
    runtime: Runtime,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    tta: bool = False,
    on_bad: Callable[[int, BadImageError], None] | None = None,
) -> np.ndarray:
    """Embed a few files in this process (queries); a bad file raises BadImageError naming it.

    With `on_bad`, a bad file is reported there (its position in `paths`, the error) and left out:
    the result then has one row per good file, in order.
    """
    transform = Transform(backbone.preprocess)
    out = []
    for start in range(0, len(paths), batch_size):
        tensors = []
        for i, p in enumerate(paths[start : start + batch_size], start):
            try:
                try:
                    tensors.append(load_tensor(user_path(p), transform)[0])
                except BadImageError as exc:
                    raise BadImageError(f"{p}: {exc}") from None
                except FileNotFoundError:
                    raise BadImageError(f"{p}: no such file") from None
            except BadImageError as exc:
                if on_bad is None:
                    raise
                on_bad(i, exc)
        if tensors:
            out.append(forward(backbone, runtime, transform, torch.stack(tensors), tta))
    return np.concatenate(out) if out else np.zeros((0, backbone.dim), np.float32)
