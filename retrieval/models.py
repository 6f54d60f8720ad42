"""Network definitions that torchvision lacks (LeNet-5) and helpers to adapt torchvision ones."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 layout (CONV-POOL-CONV-POOL-CONV-FC-FC) on 32x32 inputs, with ReLU and max-pooling.

    The names mirror torchvision's AlexNet/VGG (`features`, `classifier`) so the 84-d penultimate
    layer is tapped as `classifier.1`, like FC7 elsewhere.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),  # 32 -> 28
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 14
            nn.Conv2d(6, 16, kernel_size=5),  # -> 10
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 5
            nn.Conv2d(16, 120, kernel_size=5),  # -> 1
            nn.ReLU(),
        )
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def replace_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first convolution for one with `in_channels` inputs (1-channel data, etc.).

    Pretrained RGB filters are summed over colour so a grey image gives the same response as the
    grey image repeated three times; random-init models just get a fresh layer.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return model
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                bias=module.bias is not None,
            )
            with torch.no_grad():
                if in_channels == 1:
                    new.weight.copy_(module.weight.sum(dim=1, keepdim=True))
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return model
    raise ValueError("model has no Conv2d layer to adapt")


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


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer (the classifier: `fc`, `classifier.6`...) for one with `num_classes`.

    Used to fine-tune ImageNet weights on the user's classes; a head that already fits is kept.
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError("model has no Linear layer to replace")
    name, module = last
    if module.out_features == num_classes:
        return model
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(module.in_features, num_classes, bias=module.bias is not None))
    return model


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
