"""Adapting networks to the data: input channels, classifier head, and torchvision builders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


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


def torchvision_builder(tv_name: str, **extra: Any) -> Callable[[int, int], nn.Module]:
    """Registry builder for torchvision's `tv_name` with random weights (`extra` goes to its constructor)."""

    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **extra)
        return replace_input_channels(model, in_channels) if in_channels != 3 else model

    return build
