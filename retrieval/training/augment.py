"""Augmentation on batched tensors (pure functions: uint8 in, normalised float out)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer index into [0, n) by mirror reflection without repeating the edge (F.pad 'reflect')."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def _normalise_nhwc(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float, normalised, returned as [B, C, H, W] in channels_last memory."""
    return (x.float() * scale + shift).permute(0, 3, 1, 2)


def crop_flip(x: torch.Tensor, size: int, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `pad`, take a random `size` crop, flip half: one gather on uint8 [B, C, R, R].

    Returns uint8 [B, size, size, C] (NHWC). With pad=0 and R == size it is a flip only. The crop
    offsets come from `gen` (a CPU generator) so runs repeat exactly on any device.
    """
    b, _, r, _ = x.shape
    lo = (r - size) // 2 - pad  # centre crop shifted by up to `pad` either way
    ty = torch.randint(0, 2 * pad + 1, (b,), generator=gen) + lo
    tx = torch.randint(0, 2 * pad + 1, (b,), generator=gen) + lo
    flips = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    ar = torch.arange(size)
    rows = _reflect(ty[:, None] + ar, r)
    cols = _reflect(tx[:, None] + ar, r)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    bi = torch.arange(b, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, size: int, n: int) -> torch.Tensor:
    """[B, size, n] weights that resample source span [start, start+length) of n pixels to `size`
    pixels with a triangle (bilinear) filter widened when shrinking, i.e. antialiased like PIL.

    Built on `start`'s device: at 224 px a batch of 256 needs 2 x 15M weights, which on the CPU
    made the GPU step 6x slower than a bare one (bench/train.py speed)."""
    dev = start.device
    scale = length / size
    centre = start[:, None] + (torch.arange(size, device=dev) + 0.5)[None, :] * scale[:, None]
    support = scale.clamp(min=1.0)[:, None, None]
    src = torch.arange(n, device=dev) + 0.5
    w = (1 - (src[None, None, :] - centre[:, :, None]).abs() / support).clamp(min=0)
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    flip: bool,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random resized crop + flip of uint8 [B, C, R, R] to float [B, C, size, size] (0-255 range).

    Each image gets its own crop box; the resize is two batched matmuls with per-image separable
    resampling matrices, so the whole batch is augmented in one pass with no Python loop.
    The default scale floor is 0.25 rather than torchvision's 0.08: user datasets are small and
    objects are usually not centred the way ImageNet's are.
    """
    b, _, r, _ = x.shape
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = log_ratio.exp()
    w = (r * (area * aspect).sqrt()).clamp(1, r)
    h = (r * (area / aspect).sqrt()).clamp(1, r)
    x0 = torch.rand(b, generator=gen) * (r - w)
    y0 = torch.rand(b, generator=gen) * (r - h)
    # Random draws stay on the CPU generator (same crops on any device); only [B] vectors move.
    flips = torch.rand(b, generator=gen) < 0.5 if flip else None
    dev = x.device
    my = _resample_matrix(y0.to(dev), h.to(dev), size, r)
    mx = _resample_matrix(x0.to(dev), w.to(dev), size, r)
    if flips is not None:
        mx = torch.where(flips.to(dev)[:, None, None], mx.flip(1), mx)
    return my[:, None] @ x.float() @ mx[:, None].transpose(-1, -2)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, C, R, R] -> the central [B, C, size, size] (what Transform does at index time)."""
    r = x.shape[-1]
    o = (r - size) // 2
    return x[:, :, o : o + size, o : o + size]


@dataclass(frozen=True)
class Augment:
    """Batched augmentation + normalisation: uint8 [B, C, R, R] -> float [B, C, S, S] for the model."""

    mode: str  # "crop", "rrc" or "none"
    size: int  # S, the network's input side
    pad: int  # crop mode: maximum shift in px
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        std = torch.tensor(self.std, device=device)
        return 1.0 / (255.0 * std), -torch.tensor(self.mean, device=device) / std

    def train(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        scale, shift = self._affine(x.device)
        if self.mode == "rrc":
            out = random_resized_crop(x, self.size, self.flip, gen)
            out = out * scale[:, None, None] + shift[:, None, None]
            return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out
        pad = self.pad if self.mode == "crop" else 0
        out = _normalise_nhwc(crop_flip(x, self.size, pad, self.flip, gen), scale, shift)
        return out if self.channels_last else out.contiguous()

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._affine(x.device)
        out = _normalise_nhwc(centre_crop(x, self.size).permute(0, 2, 3, 1), scale, shift)
        return out if self.channels_last else out.contiguous()
