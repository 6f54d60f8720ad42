"""ResNets for 28-64 px images (3x3 stride-1 stem, no max-pool), with the registry's builder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SmallResNet(nn.Module):
    """ResNet for 28-64 px images: 3x3 stride-1 stem and no max-pool, so a 32 px image keeps its
    detail into the first stage (the ImageNet stem would shrink it 4x before any residual block).

    Built from torchvision's BasicBlock/Bottleneck with the same attribute names as torchvision's
    ResNet (`conv1`, `layer1`.., `fc`), so the pooled embedding is the FX node `flatten` as in the
    ImageNet ResNets. `widths` sets the channels of each stage (three or four stages).
    """

    def __init__(
        self,
        block: str = "basic",
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck

        if len(layers) != len(widths):
            raise ValueError("layers and widths need one entry per stage")
        block_cls: type[BasicBlock] | type[Bottleneck] = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            stages.append(self._make_layer(block_cls, w, n, stride=1 if i == 0 else 2))
        # Named layer1..layerN like torchvision so tapping `layer3` etc. works the same way.
        for i, stage in enumerate(stages, start=1):
            setattr(self, f"layer{i}", stage)
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block_cls.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: every block starts as the identity, which
        # trains faster and more stably from scratch (Goyal et al. 2017, "bag of tricks").
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def small_resnet_builder(
    block: str, layers: tuple[int, ...], widths: tuple[int, ...]
) -> Callable[[int, int], nn.Module]:
    """Registry builder for one SmallResNet layout."""

    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return SmallResNet(block, layers, widths, num_classes=num_classes, in_channels=in_channels)

    return build
