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
