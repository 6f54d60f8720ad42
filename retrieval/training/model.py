"""The classifier to train: built fresh or from ImageNet weights, probed, initialised from data."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from retrieval.backbones import BackboneSpec, get_spec
from retrieval.device import Runtime
from retrieval.errors import RetrieveError, first_line
from retrieval.preprocess import Preprocess
from retrieval.training.augment import Augment
from retrieval.training.data import ImageSource


def trainable_archs() -> list[str]:
    """Registry names that `retrieve train --arch` accepts (everything but the pixel baseline)."""
    from retrieval.backbones import list_backbones

    return [n for n in list_backbones() if get_spec(n).builder is not None]


def build_model(
    spec: BackboneSpec, num_classes: int, in_channels: int, pretrained: str | None
) -> tuple[nn.Module, Preprocess | None]:
    """A fresh or ImageNet-initialised classifier; returns it with the preprocessing its weights need
    (None from scratch, where normalisation is measured on the training images)."""
    from retrieval.models import replace_head, replace_input_channels

    if spec.builder is None:
        raise RetrieveError(
            f"{spec.name} has nothing to train; choose one of {', '.join(trainable_archs())}."
        )
    if pretrained is None:
        return spec.builder(num_classes, in_channels), None
    if spec.weights is None:
        raise RetrieveError(
            f"{spec.name} has no ImageNet weights to fine-tune; drop «pretrained» to train it from scratch."
        )
    from retrieval.backbones import fold_transform_input, imagenet_preprocess, load_imagenet
    from retrieval.errors import WeightsUnavailableError

    try:
        model = load_imagenet(spec)
    except WeightsUnavailableError as exc:
        # The registry's message ends with index flags; say what applies to training instead.
        first = str(exc).split(", or use:")[0]
        raise WeightsUnavailableError(
            f"{first}.\n  Or train from scratch: drop «pretrained» (small images: «arch» resnet8_small)."
        ) from None
    pre = imagenet_preprocess(spec)
    if spec.transform_input:
        # torchvision's ImageNet GoogLeNet re-normalises its input internally; the checkpoint is
        # rebuilt without that flag, so fold it into the recorded normalisation instead (equal maths).
        pre = fold_transform_input(model, pre)
    model = replace_head(model, num_classes)
    if in_channels != 3:
        model = replace_input_channels(model, in_channels)
        # One grey channel stands for R=G=B: its statistics are the average of the three.
        m, s = sum(pre.mean) / 3, sum(pre.std) / 3
        pre = replace(pre, mean=(m,) * 3, std=(s,) * 3, channels=in_channels)
    return model, pre


def init_from_data(model: nn.Module, source: ImageSource, augment: Augment, seed: int, n: int = 5000) -> None:
    """Hand `model.init_from_data` up to `n` seeded training images, normalised as for evaluation."""
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
    chunks = [x for x, _ in source.batches(order, 500)]
    x = augment.eval(torch.cat(chunks))
    model.init_from_data(x)  # type: ignore[operator]


def probe(model: nn.Module, name: str, channels: int, size: int, runtime: Runtime) -> None:
    """Fail before training when the input is too small for the network (e.g. AlexNet under ~63 px)."""
    model.eval()
    try:
        with torch.no_grad(), runtime.autocast():
            model(torch.zeros(2, channels, size, size, device=runtime.device))
    except RuntimeError as exc:
        raise RetrieveError(
            f"{name} cannot take {size}x{size} inputs ({first_line(exc, 160)}); use a larger «image_size»."
        ) from None
    finally:
        model.train()
