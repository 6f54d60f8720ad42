"""A deterministic generator of a labelled image set where pixel space misleads and shape is the label."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow")


@dataclass(frozen=True)
class SampleConfig:
    """What `make_samples` draws."""

    per_class: int = 60  # images per class in the train split
    test_per_class: int = 20  # images per class in the test split ("" disables the split)
    size: int = 64  # side in pixels
    classes: tuple[str, ...] = CLASSES
    seed: int = 0
    format: str = "png"  # png or jpg


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]

    if kind == "square":
        return rot([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    if kind == "triangle":
        return rot([(math.cos(a), math.sin(a)) for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 4)[:3]])
    if kind == "star":
        pts = []
        for i in range(10):
            rr = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return rot(pts)
    if kind == "cross":
        w = 0.3
        return rot(
            [
                (-w, -1),
                (w, -1),
                (w, -w),
                (1, -w),
                (1, w),
                (w, w),
                (w, 1),
                (-w, 1),
                (-w, w),
                (-1, w),
                (-1, -w),
                (-w, -w),
            ]
        )
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3 / 17
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17
        return rot(list(zip(x.tolist(), y.tolist(), strict=True)))
    if kind == "arrow":
        return rot([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
    raise ValueError(kind)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random colour gradient with noise: large pixel-space differences that carry no label."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (
        np.linspace(0, 1, size)[None, :, None]
        if rng.random() < 0.5
        else np.linspace(0, 1, size)[:, None, None]
    )
    grad = c0 * (1 - t) + c1 * t
    grad = np.broadcast_to(grad, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8))


def draw_sample(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class `kind` at a random position, scale, rotation and colour."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.16, 0.34)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi) if kind not in ("circle", "ring") else 0.0
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(2, int(r * 0.3)))
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=colour)
    # A distractor blob of random colour: more pixel-space noise unrelated to the label.
    if rng.random() < 0.5:
        br = size * rng.uniform(0.05, 0.1)
        bx, by = rng.uniform(0, size), rng.uniform(0, size)
        draw.rectangle((bx, by, bx + br, by + br), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.8))))


def make_samples(out: str | os.PathLike, config: SampleConfig = SampleConfig()) -> Path:
    """Write `out/train/<class>/NNNN.<ext>` (and `out/test/...`); same config, same bytes.

    Existing files are overwritten, nothing else in `out` is touched.
    """
    out = Path(out)
    splits = [("train", config.per_class)]
    if config.test_per_class:
        splits.append(("test", config.test_per_class))
    ext = "jpg" if config.format in ("jpg", "jpeg") else "png"
    for split_index, (split, n) in enumerate(splits):
        for class_index, kind in enumerate(config.classes):
            folder = out / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            # One stream per (split, class): adding classes or images never changes other files.
            rng = np.random.default_rng([config.seed, split_index, class_index])
            for i in range(n):
                img = draw_sample(kind, rng, config.size)
                path = folder / f"{i:04d}.{ext}"
                if ext == "jpg":
                    img.save(path, quality=90)
                else:
                    img.save(path, optimize=False)
    return out
