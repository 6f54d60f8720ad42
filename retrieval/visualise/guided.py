"""Guided backprop's activations: ReLU, ReLU6 and GELU whose backward passes only positive signal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Guided backprop


class _GuidedReLUFunction(torch.autograd.Function):
    """ReLU forward; backward passes only positive gradients through positive inputs (Springenberg 2015)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        # A fresh bool mask rather than the input or output: later in-place ops on either (ReLU
        # inplace=True, `out += identity`) cannot invalidate what backward needs, and it is 4x smaller.
        ctx.save_for_backward(x > 0)
        # relu and where rather than multiplying by the bool mask, which converts it to float first:
        # measured 1.6x faster per guided ReLU on 2 EPYC cores (forward plus backward).
        return torch.relu(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0).clamp_(min=0)


def guided_relu(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Drop-in for F.relu / torch.relu / Tensor.relu (any `inplace` flag is ignored: never in place)."""
    return _GuidedReLUFunction.apply(x)


class GuidedReLU(nn.Module):
    """Module form of `guided_relu`, swapped in for nn.ReLU (whatever its `inplace`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLUFunction.apply(x)


class _GuidedReLU6Function(torch.autograd.Function):
    """ReLU6 forward (EfficientNet-Lite, MobileNet); backward as guided ReLU's, through the inputs
    where ReLU6 is not flat (0 < x < 6)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward((x > 0) & (x < 6))
        return x.clamp(0.0, 6.0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0).clamp_(min=0)


class GuidedReLU6(nn.Module):
    """Module form of the guided ReLU6, swapped in for nn.ReLU6."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLU6Function.apply(x)


class _GuidedGELUFunction(torch.autograd.Function):
    """GELU forward; backward keeps only positive gradients, times GELU's own derivative.

    The guided rule for ReLU is "backprop's local derivative, and only positive signal from above";
    applied to GELU (airnet_small) the local derivative is Phi(x) + x phi(x) instead of the 0/1 mask.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # PyTorch's own GELU backward (grad * GELU'(x)), fed only the positive part of the gradient.
        return torch.ops.aten.gelu_backward(grad.clamp(min=0), x)


def guided_gelu(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Drop-in for F.gelu (the exact, erf form; an `approximate="tanh"` request gets it too)."""
    return _GuidedGELUFunction.apply(x)


class GuidedGELU(nn.Module):
    """Module form of `guided_gelu`, swapped in for nn.GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedGELUFunction.apply(x)
