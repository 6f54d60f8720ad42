"""How an image becomes a network's input tensor: the Preprocess record and normalisation constants.

The bottom layer: the index manifest, checkpoints, decoding and every backbone share it, so it
imports nothing of ours but errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from retrieval.errors import RetrieveError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input tensor; recorded in every index manifest."""

    size: int  # side of the square tensor fed to the network
    resize: int  # shorter side is resized to this before the centre crop (ignored when squash)
    squash: bool = False  # resize the whole image to size x size, ignoring aspect (pixel baseline)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3  # 1 converts to greyscale
    interpolation: str = "bilinear"
    # Set: an image whose shorter side is below `resize` is enlarged with this interpolation, and
    # only as far as `size` (no crop margin). None: every image is resized to `resize` with
    # `interpolation` (how indexes made before this field embed). Bicubic enlargement of small
    # sources rings at every edge, which ImageNet networks read as texture (bench/RESULTS.md, #14).
    upscale: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise RetrieveError(f"Unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})
