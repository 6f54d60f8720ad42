"""AirNet: the fast 32 px classifier after airbench94, with the registry's builder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class AirNet(nn.Module):
    """Fast 32 px classifier after airbench94 (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds"):
    a frozen 2x2 patch-whitening stem, then three conv-pool-BN-GELU / conv-BN-GELU groups.

    It is the quickest route to ~90% on CIFAR-10 on a CPU: about 5x the FLOPs of resnet8_small per
    image but far fewer epochs. What makes it sample-efficient is kept: the stem is whitened from
    the training images (`init_from_data`, which `retrieve train` calls before the first step) and
    never trained; every 3x3 conv starts as a partial identity (dirac), an implicit residual; BN
    scales are fixed at 1 (only shifts learn); logits are scaled down by 1/9. The pooled 256-d
    vector is the FX node `flatten`, like the ResNets.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (64, 256, 256),
        residual: bool = False,
    ) -> None:
        super().__init__()
        stem_width = 2 * in_channels * 2 * 2  # +/- each whitened direction of a 2x2 patch
        self.stem = nn.Conv2d(in_channels, stem_width, kernel_size=2, padding=0, bias=True)
        # Frozen from construction (not only after whitening) so the set of trained parameters,
        # and hence the optimiser state a resumed run loads, never depends on how the run began.
        self.stem.weight.requires_grad_(False)
        nn.init.zeros_(self.stem.bias)
        self.act = nn.GELU()
        groups, c = [], stem_width
        for w in widths:
            groups.append(_AirGroup(c, w, residual))
            c = w
        self.layer1, self.layer2, self.layer3 = groups
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c, num_classes, bias=False)
        self.logit_scale = 1 / 9

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2x2 patches of `x` (normalised [N, C, H, W] training images)."""
        k = self.stem.kernel_size
        c = x.shape[1]
        patches = x.float().unfold(2, k[0], 1).unfold(3, k[1], 1)  # N, C, H', W', kh, kw
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k[0] * k[1])
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)  # ascending; the filter order does not matter
        filters = (eigvec.T / torch.sqrt(eigval + eps)[:, None]).reshape(-1, c, *k)
        self.stem.weight.copy_(torch.cat([filters, -filters]).to(self.stem.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x))) * self.logit_scale


class _AirGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU; with `residual`, the second
    half is a ResNet basic unit: GELU(x + BN(conv(x)))."""

    def __init__(self, c_in: int, c_out: int, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            # Dirac init of the first c_in filters: the group starts close to passing its input on.
            nn.init.dirac_(conv.weight[: conv.in_channels])
        for bn in (self.bn1, self.bn2):
            bn.weight.requires_grad_(False)  # scale fixed at 1: conv weights carry the scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        y = self.bn2(self.conv2(x))
        return self.act(x + y if self.residual else y)


def airnet_builder(residual: bool) -> Callable[[int, int], nn.Module]:
    """Registry builder for AirNet, plain or with identity shortcuts (`residual`)."""

    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return AirNet(num_classes=num_classes, in_channels=in_channels, residual=residual)

    return build
