"""Decoding one file: every PIL mode to RGB, the preprocessing transform, and the Decoder seam."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import BadImageError
from retrieval.preprocess import Preprocess

# PIL's default bomb limit (~89 Mpx) warns at 1x and raises at 2x; we treat anything over 1x as a
# bomb and skip it, so a hostile file cannot make a worker allocate gigabytes.
MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# A truncated file must fail loudly, not be padded with grey and indexed as if it were whole.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every PIL mode to 8-bit RGB; transparency is composited on white, 16-bit is rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(
    path: str | os.PathLike, draft: Callable[[int, int], tuple[int, int]] | None = None
) -> Image.Image:
    """Decode one file to an RGB PIL image with EXIF orientation applied, or raise BadImageError.

    `draft(width, height)` gives the smallest size needed, so a JPEG can decode at a reduced scale
    (DCT scaling) when it is at least twice that size: most of the decode cost of a large photo.
    The original size, as displayed (after rotation), is kept in `img.info["original_size"]`.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                original = img.size
                if draft is not None and img.format == "JPEG":
                    img.draft("RGB", draft(*original))
                img.load()
                if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn 90 degrees
                    original = original[::-1]  # the size as displayed, like the pixels we embed
                img = _to_rgb(ImageOps.exif_transpose(img) or img)
                img.info["original_size"] = original
                return img
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image: {reason}"
        raise BadImageError(f"cannot decode: {reason}") from None
    except Exception as exc:  # a broken file must never kill a run; PIL raises many kinds
        raise BadImageError(f"cannot decode ({type(exc).__name__}): {exc}") from None


class Transform:
    """PIL RGB image -> float tensor [C, size, size], exactly as recorded in a Preprocess."""

    def __init__(self, pre: Preprocess) -> None:
        self.pre = pre
        self.mean = torch.tensor(pre.mean[: pre.channels]).view(-1, 1, 1)
        self.std = torch.tensor(pre.std[: pre.channels]).view(-1, 1, 1)
        self.resample = _INTERPOLATION[pre.interpolation]
        self.upsample = _INTERPOLATION[pre.upscale or pre.interpolation]

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest size (same aspect) that the resize step needs from the decoder."""
        if self.pre.squash:
            return (self.pre.size, self.pre.size)
        scale = self.pre.resize / min(width, height)
        return (max(1, round(width * scale)), max(1, round(height * scale)))

    def resize_crop(self, img: Image.Image) -> Image.Image:
        pre = self.pre
        w, h = img.size
        side = pre.resize
        resample = self.resample
        if min(w, h) < (pre.size if pre.squash else pre.resize) and pre.upscale:
            resample = self.upsample
            # The crop margin exists to drop a photo's borders; a 32 px source has none to spare:
            # enlarge it only to the input size (CIFAR-10: P@10 0.48 -> 0.51, bench/RESULTS.md).
            side = max(min(w, h), pre.size)
        if pre.squash:
            return img.resize((pre.size, pre.size), resample, reducing_gap=3.0)
        scale = side / min(w, h)
        nw, nh = max(pre.size, round(w * scale)), max(pre.size, round(h * scale))
        left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
        if nw * nh > 16 * pre.size * pre.size:
            # A very thin image (1 x 10,000 px) would be resized to 256 x 2,560,000 only to keep a
            # 224 px square: resample just the source box that becomes the crop. Memory stays
            # bounded; ordinary aspect ratios keep the resize-then-crop path, pixel for pixel.
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + pre.size) * sx, (top + pre.size) * sy)
            return img.resize((pre.size, pre.size), resample, box=box, reducing_gap=3.0)
        img = img.resize((nw, nh), resample, reducing_gap=3.0)
        return img.crop((left, top, left + pre.size, top + pre.size))

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """Resized, cropped uint8 tensor [C, H, W]; normalisation is left to `normalize`."""
        img = self.resize_crop(img)
        if self.pre.channels == 1:
            img = img.convert("L")
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [.., C, H, W] (on any device) -> normalised float32."""
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return (batch.float().div_(255.0) - mean) / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(img))


def load_tensor(path: str | os.PathLike, transform: Transform) -> tuple[torch.Tensor, int, int]:
    """Decode + resize one file to uint8 [C,H,W]; returns (tensor, original width, height)."""
    img = open_image(path, draft=transform.draft_size)
    width, height = img.info["original_size"]
    return transform.to_uint8(img), width, height


class Decoder(Protocol):
    """Turns one image file into the uint8 tensor a Transform makes: the seam for other decoders.

    `decode_all` calls it in its loader and isolation processes, file after file, so an
    implementation must be picklable (spawn sends it to each process). A file it cannot read
    raises BadImageError, whose message is the ledger's reason; any other exception is a bug and
    stops the run. A GPU decoder (nvJPEG) answers the same per-file call; a batched call can be
    added beside it when one exists.
    """

    @property
    def name(self) -> str:
        """What the decoder is called in messages and benchmarks ("pil")."""
        ...

    def decode(self, path: str | os.PathLike, transform: Transform) -> tuple[torch.Tensor, int, int]:
        """uint8 [C, H, W] resized and cropped by `transform`, and the original (displayed) width, height."""
        ...


@dataclass(frozen=True)
class PILDecoder:
    """The default Decoder: PIL in the calling process, exactly `load_tensor`."""

    name: str = "pil"

    def decode(self, path: str | os.PathLike, transform: Transform) -> tuple[torch.Tensor, int, int]:
        return load_tensor(path, transform)
