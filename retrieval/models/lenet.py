"""LeNet-5 for 32x32 inputs, with the registry's builder for it."""

from __future__ import annotations

import torch
from torch import nn

# LeNet-5's fully connected layer takes the 120 maps of 1x1 that only a 32 px input leaves.
INPUT_SIZE = 32


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


def build_lenet5(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Registry builder: a LeNet-5 with random weights."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels)
