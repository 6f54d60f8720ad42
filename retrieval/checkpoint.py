"""Checkpoint files written by `retrieve train` and read by the backbone registry (weights_only=True)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retrieval.atomic import atomic_write
from retrieval.errors import CheckpointError, first_line
from retrieval.preprocess import Preprocess

FORMAT = "retrieve-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A trained model and everything `index --weights` needs to use it without other flags."""

    arch: str  # registry name
    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    preprocess: Preprocess  # input size, channels, normalisation
    num_classes: int
    in_channels: int
    # Training state for --resume and the run's config; only plain containers and tensors.
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Write atomically: a killed process leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": ckpt.arch,
        "state_dict": ckpt.state_dict,
        "classes": list(ckpt.classes),
        "preprocess": ckpt.preprocess.to_dict(),
        "num_classes": ckpt.num_classes,
        "in_channels": ckpt.in_channels,
        "extra": ckpt.extra,
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint with `weights_only=True`; anything else is a clear CheckpointError."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(
            f"Weights {str(path)!r} are neither 'imagenet', 'none' nor an existing checkpoint file."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a usable checkpoint"
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {first_line(exc)})."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a `retrieve train` checkpoint (no '{FORMAT}' header). Plain state dicts "
            "are not accepted because they do not say which architecture and preprocessing they need."
        )
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer retrieve (format {payload['version']}).")
    try:
        return Checkpoint(
            arch=payload["arch"],
            state_dict=payload["state_dict"],
            classes=tuple(payload["classes"]),
            preprocess=Preprocess.from_dict(payload["preprocess"]),
            num_classes=int(payload["num_classes"]),
            in_channels=int(payload["in_channels"]),
            extra=payload.get("extra", {}),
        )
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is missing checkpoint field {exc}.") from None
