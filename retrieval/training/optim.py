"""The optimiser (decay on weights only, an optional norm-shift rate) and the warm-up + decay schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from retrieval.training.config import TrainConfig, with_recipe


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, norm_bias_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Decay only weight matrices and kernels; norm scales and biases (1-d) are not regularised.

    With `norm_bias_lr_scale` != 1 the shifts of the normalisation layers get their own group at
    that multiple of the rate (airbench's 64x: with fixed BN scales, the shifts are each channel's
    only threshold and move far faster than the 1/fan-in-sized weights they sit on).
    """
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_bias_ids = set()
    if norm_bias_lr_scale != 1.0:
        norm_bias_ids = {
            id(m.bias)
            for m in model.modules()
            if isinstance(m, norms) and getattr(m, "bias", None) is not None
        }
    decay, no_decay, norm_bias = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if id(p) in norm_bias_ids:
                norm_bias.append(p)
            else:
                (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    if norm_bias_ids:  # only then: a run without it keeps the two groups older checkpoints hold
        groups.append({"params": norm_bias, "weight_decay": 0.0, "lr": lr * norm_bias_lr_scale})
    return groups


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, Nesterov) or AdamW over `param_groups`, at the recipe-filled rate and decay."""
    c = with_recipe(config)
    assert c.lr is not None and c.weight_decay is not None
    assert c.norm_bias_lr_scale is not None
    groups = param_groups(model, c.weight_decay, c.lr, c.norm_bias_lr_scale)
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.999))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak rate at optimiser step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "onecycle":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` per optimiser step: warm-up capped at a third of the run, then cosine or one-cycle."""
    c = with_recipe(config)
    assert c.epochs is not None and c.warmup_epochs is not None and c.schedule is not None
    total = c.epochs * steps_per_epoch
    warmup = min(round(c.warmup_epochs * steps_per_epoch), total // 3)
    schedule = c.schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule))
