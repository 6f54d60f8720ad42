"""What the visualisations read: a classifier with its preprocessing, and images from a file or folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import BadImageError, EmptyInputError, RetrieveError
from retrieval.images import (
    IMAGE_EXTENSIONS,
    Decoder,
    ImageFileEntry,
    PILDecoder,
    Transform,
    decode_all,
    load_tensor,
    scan,
)
from retrieval.images import Batch as DecodedBatch
from retrieval.paths import user_path
from retrieval.preprocess import Preprocess


@dataclass(frozen=True)
class VizModel:
    """A full classifier (eval mode, never modified by the visualisations) and how its inputs are made."""

    model: nn.Module
    preprocess: Preprocess
    classes: tuple[str, ...] = ()  # class names when known (checkpoint or ImageNet weights)
    name: str = "model"  # for titles: "lenet, checkpoint best.pt"

    def class_name(self, index: int) -> str:
        return self.classes[index] if 0 <= index < len(self.classes) else str(index)

    @property
    def channels(self) -> int:
        return self.preprocess.channels


def load_model(backbone: str | None = None, weights: str | os.PathLike | None = None) -> VizModel:
    """A registry backbone's full classifier with `weights` ("imagenet", "none" or a checkpoint path)."""
    from retrieval.backbones import get_spec, imagenet_classes, load_backbone

    bb = load_backbone(backbone, weights)
    if bb.model is None:
        raise RetrieveError(f"{bb.spec.name} has no network to visualise; choose a convnet backbone.")
    classes = bb.classes
    if not classes and bb.weights.kind == "imagenet":
        classes = imagenet_classes(get_spec(bb.spec.name))
    return VizModel(bb.model.eval(), bb.preprocess, tuple(classes), f"{bb.spec.name}, {bb.weights.id}")


def list_images(path: str | os.PathLike) -> tuple[list[ImageFileEntry], list[tuple[str, str]]]:
    """One image file, or every image below a folder (sorted); plus (relpath, reason) problems."""
    path = user_path(path)
    if path.is_dir():
        entries, problems = scan(path)
    elif path.is_file():
        st = path.stat()
        entries = [
            ImageFileEntry(path.absolute(), path.name, path.absolute().parent.name, st.st_size, st.st_mtime)
        ]
        problems = []  # an explicitly named file is tried whatever its extension; decoding decides
    else:
        raise EmptyInputError(f"{path} does not exist.")
    if not entries:
        raise EmptyInputError(f"No images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {path}.")
    return entries, problems


def nothing_decoded(path: str | os.PathLike, total: int, skipped: list[tuple[str, str]]) -> BadImageError:
    """The error for a run in which no image decoded: it names the first few files and why."""
    if Path(path).is_file() and skipped:
        return BadImageError(f"{path} could not be decoded: {skipped[0][1]}")
    shown = "; ".join(f"{rel}: {why}" for rel, why in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return BadImageError(f"None of the {total} images under {path} could be decoded ({shown}{more}).")


@dataclass
class Batch:
    """Decoded images of one batch: normalised inputs and the uint8 pictures they came from."""

    entries: list[ImageFileEntry]
    pixels: torch.Tensor  # uint8 [B, C, H, W], resized and cropped
    inputs: torch.Tensor  # float32 [B, C, H, W], normalised for the network
    skipped: list[tuple[str, str]]  # (relpath, reason) of files in this stretch that failed to decode


def decode_batches(
    entries: list[ImageFileEntry],
    transform: Transform,
    batch_size: int,
    consume: Callable[[Batch], None],
    *,
    decoder: Decoder = PILDecoder(),
) -> None:
    """Hand `consume` the entries decoded, in order, in batches of up to `batch_size` files.

    A folder is decoded ahead in a loader process, where a file that crashes the C decoder is
    skipped with the reason instead of killing the run (`retrieval.images.decode_all`); one batch
    or less is decoded here. A batch the loader hands over again after an interruption
    (`decode_all` explains when) is consumed once. `decoder` decodes each file (default: PIL).
    """
    if batch_size < 1:
        raise RetrieveError("batch size must be at least 1")
    by_path = {e.relpath: e for e in entries}
    consumed: set[int] = set()

    def take(b: DecodedBatch) -> None:
        if b.start in consumed:
            return
        pixels = b.images if b.rows else torch.empty(0, dtype=torch.uint8)
        inputs = transform.normalize(pixels) if b.rows else torch.empty(0)
        good = [by_path[r["path"]] for r in b.rows]
        consume(Batch(good, pixels, inputs, [(r["path"], r["reason"]) for r in b.skipped]))
        consumed.add(b.start)

    workers = 1 if len(entries) > batch_size else 0
    decode_all(entries, transform, batch_size, workers, take, decoder=decoder)


def load_image(path: str | os.PathLike, preprocess: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """One image as (uint8 [C, H, W], normalised float [C, H, W]); a bad file raises BadImageError."""
    if not Path(path).exists():
        raise EmptyInputError(f"{path} does not exist.")
    if Path(path).is_dir():
        raise RetrieveError(f"{path} is a folder; give one image file.")
    transform = Transform(preprocess)
    try:
        pixels, _, _ = load_tensor(path, transform)
    except BadImageError as exc:
        raise BadImageError(f"{path}: {exc}") from None
    return pixels, transform.normalize(pixels)
