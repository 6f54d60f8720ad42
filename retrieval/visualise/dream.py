"""Gradient ascent on the input: the image that maximally excites a class score or a unit of any layer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

from retrieval.device import resolve_runtime
from retrieval.errors import RetrieveError, first_line
from retrieval.visualise import render
from retrieval.visualise.probe import Probe, Target, target_scores
from retrieval.visualise.source import VizModel

PARAMS = ("pixel", "fft")
INITS = ("zeros", "noise")

# Square root of ImageNet's colour correlation (Olah et al., Lucid): the FFT parameterisation
# optimises decorrelated colour, which keeps high-frequency colour noise out of the result.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_SQRT = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


@dataclass(frozen=True)
class DreamConfig:
    """Settings of `retrieve viz dream`: maximise S(I) - l2 * mean(I^2) under the regularisers below."""

    steps: int = 200
    lr: float = 0.05  # Adam step size on the image parameters
    l2: float = 1e-3  # lambda of the L2 decay, on the mean square so one value fits every input size
    jitter: int | None = None  # random shift in pixels each step; None = size // 16 (at least 1)
    blur_every: int = 4  # pixel parameterisation: Gaussian-blur the image every this many steps (0 = off)
    blur_sigma: float = 0.5  # in pixels
    clip_percentile: float = 5.0  # with each blur, zero pixels whose norm is below this percentile (0 = off)
    param: str = "pixel"  # "pixel", or "fft": 1/f-scaled Fourier basis with decorrelated colour
    init: str = "noise"  # start from "zeros" (the mean image) or small "noise"
    size: int | None = None  # image side; None = the model's input size
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.param not in PARAMS:
            raise RetrieveError(f"Unknown parameterisation {self.param!r}; choose {' or '.join(PARAMS)}.")
        if self.init not in INITS:
            raise RetrieveError(f"Unknown init {self.init!r}; choose {' or '.join(INITS)}.")
        if self.steps < 1:
            raise RetrieveError("steps must be at least 1")
        # Written as what must hold, so NaN and infinity fail too.
        if not 0 < self.lr < math.inf:
            raise RetrieveError(f"lr must be positive and finite, not {self.lr}")
        if not 0 <= self.l2 < math.inf:
            raise RetrieveError(f"l2 must be at least 0 and finite, not {self.l2}")
        if self.jitter is not None and self.jitter < 0:
            raise RetrieveError(f"jitter must be at least 0 pixels, not {self.jitter}")
        if self.blur_every < 0:
            raise RetrieveError(f"blur-every must be at least 0 (0 = never), not {self.blur_every}")
        if self.blur_every and not 0 < self.blur_sigma < math.inf:
            raise RetrieveError(
                f"blur sigma must be positive, not {self.blur_sigma} (use «blur_every» 0 for no blur)"
            )
        if self.size is not None and self.size < 8:
            raise RetrieveError("size must be at least 8 pixels")
        if not 0 <= self.clip_percentile < 100:
            raise RetrieveError("clip percentile must be in [0, 100)")


@dataclass
class DreamResult:
    """The generated image and how the objective moved."""

    image: np.ndarray  # uint8 [H, W, C], C = the model's channels
    start_score: float  # objective on the starting image (no jitter)
    final_score: float  # objective on the result (no jitter)
    history: list[float] = field(default_factory=list)  # objective at each step (jittered input)
    objective: str = ""


class _PixelImage:
    """The image itself, in the network's normalised space (zero = the dataset's mean colour)."""

    def __init__(
        self,
        shape: tuple[int, ...],
        lo: torch.Tensor,
        hi: torch.Tensor,
        config: DreamConfig,
        gen: torch.Generator,
    ) -> None:
        init = torch.randn(shape, generator=gen) * 0.1 if config.init == "noise" else torch.zeros(shape)
        self.x = init.to(lo.device).clamp(lo, hi).requires_grad_(True)
        self.lo, self.hi, self.config = lo, hi, config

    def params(self) -> list[torch.Tensor]:
        return [self.x]

    def __call__(self) -> torch.Tensor:
        return self.x

    @torch.no_grad()
    def project(self, step: int) -> None:
        c = self.config
        x = self.x
        if c.blur_every and step % c.blur_every == 0:
            k = 2 * math.ceil(2 * c.blur_sigma) + 1
            x.copy_(gaussian_blur(x, [k, k], [c.blur_sigma, c.blur_sigma]))
            if c.clip_percentile > 0:
                # Yosinski et al. 2015: pixels with little energy are noise; set them to the mean colour.
                norms = x.norm(dim=1, keepdim=True)
                threshold = torch.quantile(norms.flatten(), c.clip_percentile / 100.0)
                x.mul_(norms >= threshold)
        x.copy_(torch.maximum(torch.minimum(x, self.hi), self.lo))  # stay a displayable image


class _FourierImage:
    """Lucid-style: spectrum scaled by 1/frequency, colour decorrelated, squashed by a sigmoid into [0, 1]."""

    def __init__(
        self,
        shape: tuple[int, ...],
        mean: torch.Tensor,
        std: torch.Tensor,
        config: DreamConfig,
        gen: torch.Generator,
    ) -> None:
        _, c, h, w = shape
        dev = mean.device
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        freqs = (fx**2 + fy**2).sqrt()
        self.scale = (1.0 / freqs.clamp_min(1.0 / max(h, w))).to(dev)
        spec_shape = (1, c, h, w // 2 + 1, 2)
        sd = 0.01 if config.init == "noise" else 0.0
        self.spectrum = (torch.randn(spec_shape, generator=gen) * sd).to(dev).requires_grad_(True)
        self.colour = _COLOR_SQRT.to(dev)
        self.h, self.w, self.c = h, w, c
        self.mean, self.std = mean, std

    def params(self) -> list[torch.Tensor]:
        return [self.spectrum]

    def __call__(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho") / 4.0
        if self.c == 3:
            img = torch.einsum("bchw,dc->bdhw", img, self.colour)
        return (torch.sigmoid(img) - self.mean) / self.std

    def project(self, step: int) -> None:  # the sigmoid keeps it valid and the 1/f scale keeps it smooth
        return None


def dream(
    vm: VizModel,
    target: Target,
    config: DreamConfig = DreamConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> DreamResult:
    """Gradient ascent from zeros or noise on a class score (pre-softmax) or a unit of any layer.

    A unit without `neuron` is its whole channel (mean over positions); with `neuron` one position.
    """
    if target.kind == "predicted":
        raise RetrieveError("Dream needs a class («class» N) or a unit («layer» L «channel» C).")
    runtime = resolve_runtime(config.device, "float32")
    dev = runtime.device
    probe = Probe(vm.model, target.layers, guided=False).to(dev)
    pre = vm.preprocess
    c = pre.channels
    size = config.size or pre.size
    shape = (1, c, size, size)
    mean = torch.tensor(pre.mean[:c], dtype=torch.float32, device=dev).view(1, c, 1, 1)
    std = torch.tensor(pre.std[:c], dtype=torch.float32, device=dev).view(1, c, 1, 1)
    gen = torch.Generator().manual_seed(config.seed)
    if config.param == "pixel":
        image: _PixelImage | _FourierImage = _PixelImage(
            shape, (0 - mean) / std, (1 - mean) / std, config, gen
        )
    else:
        image = _FourierImage(shape, mean, std, config, gen)
    jitter = config.jitter if config.jitter is not None else max(1, size // 16)
    objective = "mean" if target.neuron is None else "max"

    def score(x: torch.Tensor) -> torch.Tensor:
        try:
            out = probe(x)
        except RuntimeError as exc:
            raise RetrieveError(
                f"The model does not accept a {size}x{size} input ({first_line(exc)}); "
                f"use its own size {pre.size}."
            ) from None
        return target_scores(out, target, spatial=objective)[0][0]

    with torch.no_grad():
        start = float(score(image()))
    opt = torch.optim.Adam(image.params(), lr=config.lr)
    history: list[float] = []
    for step in range(1, config.steps + 1):
        x = image()
        if jitter:
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        s = score(x)
        loss = -s + config.l2 * x.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        image.project(step)
        history.append(float(s.detach()))
        if progress is not None:
            progress(step, config.steps)
    with torch.no_grad():
        final_x = image().detach()
        final = float(score(final_x))
    picture = render.to_uint8(render.denormalise(final_x[0], pre))
    return DreamResult(picture, start, final, history, target.describe(vm.classes))
