"""Batched feature extraction: the model side of turning decoded images into vectors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from retrieval.backbones import Backbone, load_backbone
from retrieval.device import Runtime
from retrieval.errors import BadImageError, RetrieveError
from retrieval.images import Transform, load_tensor
from retrieval.paths import user_path

if TYPE_CHECKING:
    from retrieval.store import Manifest


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
                tensors.append(load_tensor(user_path(p), transform)[0])
            except (BadImageError, FileNotFoundError) as exc:
                error = BadImageError(f"{p}: {exc if isinstance(exc, BadImageError) else 'no such file'}")
                if on_bad is None:
                    raise error from None
                on_bad(i, error)
        if tensors:
            out.append(forward(backbone, runtime, transform, torch.stack(tensors), tta))
    return np.concatenate(out) if out else np.zeros((0, backbone.dim), np.float32)


def load_recorded_backbone(manifest: Manifest) -> Backbone:
    """The backbone an index was built with, so that queries embed like its database.

    Refuses weights whose hash differs from the recorded one, and a preprocessing that differs.
    """
    w = manifest.weights
    if w.kind == "precomputed":
        raise RetrieveError(
            f"This index holds precomputed vectors (from {manifest.root}): it has no network to embed "
            "image files with. Query it by id (`--id`) or with vectors (`Index.search_vectors`)."
        )
    if w.kind == "pixels":
        weights = None
    elif w.kind == "checkpoint":
        weights = manifest.checkpoint
        if not weights or not Path(weights).exists():
            raise RetrieveError(
                f"The index was built with checkpoint {w.id} ({weights}), which is no longer there; "
                "queries must be embedded with the same weights."
            )
    else:
        weights = w.kind
    backbone = load_backbone(manifest.backbone, weights, manifest.layer or None)
    if backbone.weights.sha256 != w.sha256:
        raise RetrieveError(
            f"The weights now loaded for {manifest.backbone} (sha256 {backbone.weights.sha256[:12]}) differ "
            f"from those the index was built with ({w.sha256[:12]}); re-index or restore the weights."
        )
    if backbone.preprocess != manifest.preprocess:
        raise RetrieveError("The backbone's preprocessing differs from the one recorded in the index.")
    return backbone
