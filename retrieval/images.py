"""Images: deterministic recursive scan, robust decode to RGB, and the preprocessing transform."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import BadImageError
from retrieval.paths import user_path
from retrieval.preprocess import Preprocess

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
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


@dataclass(frozen=True)
class ImageFileEntry:
    """One file found by `scan`: its path relative to the root and its label (parent folder)."""

    path: Path  # absolute (symlinks kept as found, so paths stay under the root)
    relpath: str  # posix, relative to the scanned root
    label: str
    size: int  # bytes
    mtime: float
    # Status change time: a rename, `mv` over the file or `touch -r` moves it even when size and
    # mtime stay (files swapped by name, copies made with `cp -p`), so resume re-embeds them.
    ctime: float = 0.0


def label_of(relpath: str, root: Path) -> str:
    parent = Path(relpath).parent
    return parent.name if parent.name else root.name


def scan(root: str | os.PathLike) -> tuple[list[ImageFileEntry], list[tuple[str, str]]]:
    """Find image files below `root` in sorted (deterministic) order, following symlinks safely.

    Returns (entries, problems): problems are (relpath, reason) for entries that cannot even be
    stat'ed (dangling links, permission denied), for the skip ledger.
    """
    root = user_path(root).absolute()
    if not root.is_dir():
        raise BadImageError(f"{root} is not a folder.")
    entries: list[ImageFileEntry] = []
    problems: list[tuple[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()
    real_root = root.resolve()

    def walk(directory: Path) -> None:
        try:
            st = directory.stat()
        except OSError as exc:
            problems.append((_printable(directory.relative_to(root).as_posix()), f"unreadable folder: {exc}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:  # a symlink loop or a second link to a folder already indexed
            return
        seen_dirs.add(key)
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            problems.append((_printable(directory.relative_to(root).as_posix()) or ".", f"unreadable: {exc}"))
            return
        subdirs = []
        for child in children:
            if child.name.startswith("."):
                continue  # hidden files and our own staging folders
            path = Path(child.path)
            rel = path.relative_to(root).as_posix()
            try:
                if child.is_dir(follow_symlinks=True):
                    # A link to a folder inside the root is walked where it really is: followed
                    # here, it would claim that folder's images under its own name (its class
                    # would vanish into the link's). Links to folders elsewhere are followed.
                    inside = child.is_symlink() and _walked_anyway(path.resolve(), real_root)
                    if not inside and not is_index_dir(path):  # an index inside the folder it indexes
                        subdirs.append(path)
                    continue
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                st = child.stat(follow_symlinks=True)
            except OSError as exc:
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    problems.append((_printable(rel), f"cannot stat: {exc.strerror or exc}"))
                continue
            shown = _printable(rel)
            if shown != rel:
                # Paths are stored as UTF-8 text (metadata, pages, JSON): one that is not cannot be
                # kept and found again, so it is skipped, shown with its raw bytes escaped.
                problems.append((shown, "file name is not valid UTF-8: rename it to index it"))
                continue
            entries.append(
                ImageFileEntry(path, rel, label_of(rel, root), st.st_size, st.st_mtime, st.st_ctime)
            )
        for sub in subdirs:
            walk(sub)

    walk(root)
    return entries, problems


def _walked_anyway(target: Path, real_root: Path) -> bool:
    """Whether the scan reaches folder `target` by itself: under the root and not hidden (a link
    to `.store/cats` is the only way in to that folder, so it is followed)."""
    if not target.is_relative_to(real_root):
        return False
    return not any(part.startswith(".") for part in target.relative_to(real_root).parts)


def _printable(rel: str) -> str:
    """`rel` itself, or with the bytes of a non-UTF-8 name escaped (`caf\\xe9.png`)."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def is_index_dir(path: Path) -> bool:
    """A `retrieve` index directory (its maps and sheets are outputs, never inputs)."""
    manifest = path / "manifest.json"
    if (path / ".staging" / "run.json").exists():
        return True
    try:
        return manifest.is_file() and b'"retrieve-index"' in manifest.read_bytes()[:4096]
    except OSError:
        return False


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

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest size (same aspect) that the resize step needs from the decoder."""
        if self.pre.squash:
            return (self.pre.size, self.pre.size)
        scale = self.pre.resize / min(width, height)
        return (max(1, round(width * scale)), max(1, round(height * scale)))

    def resize_crop(self, img: Image.Image) -> Image.Image:
        pre = self.pre
        if pre.squash:
            return img.resize((pre.size, pre.size), self.resample, reducing_gap=3.0)
        w, h = img.size
        scale = pre.resize / min(w, h)
        nw, nh = max(pre.size, round(w * scale)), max(pre.size, round(h * scale))
        left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
        if nw * nh > 16 * pre.size * pre.size:
            # A very thin image (1 x 10,000 px) would be resized to 256 x 2,560,000 only to keep a
            # 224 px square: resample just the source box that becomes the crop. Memory stays
            # bounded; ordinary aspect ratios keep the resize-then-crop path, pixel for pixel.
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + pre.size) * sx, (top + pre.size) * sy)
            return img.resize((pre.size, pre.size), self.resample, box=box, reducing_gap=3.0)
        img = img.resize((nw, nh), self.resample, reducing_gap=3.0)
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


def placeholder(size: int) -> np.ndarray:
    """A grey tile with a cross: what a missing or unreadable image looks like (map, sheet)."""
    from PIL import ImageDraw

    img = Image.new("RGB", (size, size), (205, 205, 205))
    d = ImageDraw.Draw(img)
    m, w = size // 4, max(1, size // 16)
    d.line((m, m, size - m, size - m), fill=(120, 120, 120), width=w)
    d.line((m, size - m, size - m, m), fill=(120, 120, 120), width=w)
    return np.asarray(img)


def square_thumbnail(img: Image.Image, size: int) -> np.ndarray:
    """Centre crop to a square, then a high-quality downscale to size x size RGB."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    out = img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)
    return np.asarray(out)
