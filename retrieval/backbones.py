"""The backbone registry: one frozen spec per name, and loading a spec's weights into a feature extractor."""

from __future__ import annotations

import hashlib
import os
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.errors import (
    CheckpointError,
    RetrieveError,
    UnknownNameError,
    WeightsUnavailableError,
    first_line,
)
from retrieval.preprocess import Preprocess


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
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"Unknown backbone {name!r}. Known backbones: {', '.join(list_backbones())}."
        ) from None


def list_backbones() -> list[str]:
    """Canonical names, in registration order."""
    return list(dict.fromkeys(s.name for s in _REGISTRY.values()))


def _tv_builder(tv_name: str, **extra: Any) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        import torchvision

        from retrieval.models import replace_input_channels

        model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **extra)
        return replace_input_channels(model, in_channels) if in_channels != 3 else model

    return build


_IMAGENET_224 = Preprocess(size=224, resize=256)

register(
    BackboneSpec(
        name="pixels",
        builder=None,
        node="",
        dim=32 * 32 * 3,
        preprocess=Preprocess(size=32, resize=32, squash=True, mean=(0.0,) * 3, std=(1.0,) * 3),
        default_weights="none",
        description="raw pixels, image squashed to 32x32 RGB in [0,1] and flattened (baseline)",
    )
)


def _lenet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    from retrieval.models import LeNet5

    return LeNet5(num_classes=num_classes, in_channels=in_channels)


register(
    BackboneSpec(
        name="lenet",
        builder=_lenet,
        node="classifier.1",
        dim=84,
        preprocess=Preprocess(size=32, resize=32, squash=True, mean=(0.5,) * 3, std=(0.5,) * 3),
        default_weights="none",
        num_classes=10,
        description="LeNet-5 (CONV-POOL-CONV-POOL-CONV-FC), 84-d FC after ReLU, 32x32 input",
    )
)
register(
    BackboneSpec(
        name="alexnet",
        builder=_tv_builder("alexnet"),
        node="classifier.5",
        dim=4096,
        preprocess=_IMAGENET_224,
        weights="AlexNet_Weights.IMAGENET1K_V1",
        description="AlexNet FC7 (after ReLU)",
    )
)
for _depth, _w in [(11, "VGG11"), (13, "VGG13"), (16, "VGG16"), (19, "VGG19")]:
    for _bn in (False, True):
        _suffix = "_bn" if _bn else ""
        register(
            BackboneSpec(
                name=f"vgg{_depth}{_suffix}",
                builder=_tv_builder(f"vgg{_depth}{_suffix}"),
                node="classifier.4",
                dim=4096,
                preprocess=_IMAGENET_224,
                weights=f"{_w}{'_BN' if _bn else ''}_Weights.IMAGENET1K_V1",
                description=f"VGG-{_depth}{' with batch norm' if _bn else ''} FC7 (after ReLU)",
            )
        )
for _depth, _dim, _w in [
    (18, 512, "V1"),
    (34, 512, "V1"),
    (50, 2048, "V2"),
    (101, 2048, "V2"),
    (152, 2048, "V2"),
]:
    register(
        BackboneSpec(
            name=f"resnet{_depth}",
            builder=_tv_builder(f"resnet{_depth}"),
            node="flatten",
            dim=_dim,
            preprocess=_IMAGENET_224,
            weights=f"ResNet{_depth}_Weights.IMAGENET1K_{_w}",
            description=f"ResNet-{_depth}, global average pool",
        )
    )
register(
    BackboneSpec(
        name="googlenet",
        builder=_tv_builder("googlenet", aux_logits=False, init_weights=True),
        node="flatten",
        dim=1024,
        preprocess=_IMAGENET_224,
        weights="GoogLeNet_Weights.IMAGENET1K_V1",
        description="GoogLeNet (Inception v1), global average pool",
    )
)


def _small_resnet(
    block: str, layers: tuple[int, ...], widths: tuple[int, ...]
) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        from retrieval.models import SmallResNet

        return SmallResNet(block, layers, widths, num_classes=num_classes, in_channels=in_channels)

    return build


# Small-image ResNets (3x3 stride-1 stem, no max-pool) for 28-64 px inputs; trained with
# `retrieve train`, they have no ImageNet weights. resnet8_small is the fast CPU choice.
_SMALL_32 = Preprocess(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
for _name, _block, _layers, _widths, _dim, _what in [
    ("resnet8_small", "basic", (1, 1, 1), (32, 64, 128), 128, "ResNet-8, 3 stages of 32/64/128 channels"),
    ("resnet18_small", "basic", (2, 2, 2, 2), (64, 128, 256, 512), 512, "ResNet-18"),
    ("resnet34_small", "basic", (3, 4, 6, 3), (64, 128, 256, 512), 512, "ResNet-34"),
    ("resnet50_small", "bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 2048, "ResNet-50"),
]:
    register(
        BackboneSpec(
            name=_name,
            builder=_small_resnet(_block, _layers, _widths),
            node="flatten",
            dim=_dim,
            preprocess=_SMALL_32,
            default_weights="none",
            num_classes=10,
            description=f"{_what} for small images (3x3 stem, no max-pool), global average pool",
        )
    )


def _air(residual: bool) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        from retrieval.models import AirNet

        return AirNet(num_classes=num_classes, in_channels=in_channels, residual=residual)

    return build


# Measured on CIFAR-10 (bench/RESULTS.md): 90.45% in 12 epochs, 23 min on 2 CPU cores (89.84% with
# the BN shifts at the base rate). Short one-cycle schedules want a high rate, strong smoothing,
# small shifts and fast-moving BN shifts (airbench's 64x) for these nets.
_AIR_RECIPE: tuple[tuple[str, Any], ...] = (
    ("epochs", 12),
    ("batch_size", 512),
    ("lr", 0.45),
    ("weight_decay", 1.5e-3),
    ("schedule", "onecycle"),
    ("warmup_epochs", 3.0),
    ("label_smoothing", 0.2),
    ("crop_pad", 2),
    ("tta", True),
    ("norm_bias_lr_scale", 64.0),
)
for _name, _residual, _what in [
    (
        "airnet_small",
        False,
        "airbench-style net (7 convs + fc) for 32 px images (whitened 2x2 stem, 64/256/256 conv groups), "
        "global max pool: the fastest to train to ~90% on CIFAR-10 on a CPU",
    ),
    (
        "airresnet_small",
        True,
        "airnet_small with an identity shortcut around each group's second conv: a small ResNet "
        "(7 convs + fc, 3 residual units) for 32 px images",
    ),
]:
    register(
        BackboneSpec(
            name=_name,
            builder=_air(_residual),
            node="flatten",
            dim=256,
            preprocess=_SMALL_32,
            default_weights="none",
            num_classes=10,
            description=_what,
            recipe=_AIR_RECIPE,
        )
    )


DEFAULT_BACKBONE = "resnet50"


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class WeightsInfo:
    """What the manifest records about the weights a backbone was loaded with."""

    kind: str  # "imagenet", "none", "checkpoint", "pixels"
    id: str  # enum entry, "random-init(seed=0)", or the checkpoint file name
    sha256: str  # of the state dict (tensors in key order), so any change of weights is caught


class Backbone(nn.Module):
    """A loaded feature extractor: images (preprocessed tensors) in, float32 vectors [B, dim] out."""

    def __init__(
        self,
        spec: BackboneSpec,
        extractor: nn.Module,
        preprocess: Preprocess,
        weights: WeightsInfo,
        layer: str,
        dim: int,
        model: nn.Module | None,
        classes: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.spec, self.extractor, self.preprocess = spec, extractor, preprocess
        self.weights, self.layer, self.dim = weights, layer, dim
        self.classes = classes
        # The full classifier (for viz / train); kept out of the module tree to avoid double counting.
        self._model = [model]

    @property
    def model(self) -> nn.Module | None:
        return self._model[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.extractor(x)
        if out.ndim == 4:  # a spatial map from --layer: average-pool it to one vector per image
            out = out.mean(dim=(2, 3))
        return out.flatten(1).float()


class _Pixels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _weights_enum(spec: BackboneSpec):
    import torchvision

    enum_name, _, entry = spec.weights.partition(".")
    return torchvision.models.get_weight(spec.weights) if entry else getattr(torchvision, enum_name)


def imagenet_preprocess(spec: BackboneSpec) -> Preprocess:
    """The preprocessing that travels with the torchvision weights (resize, crop, mean, std)."""
    if spec.weights is None:
        return spec.preprocess
    tf = _weights_enum(spec).transforms()
    return Preprocess(
        size=int(tf.crop_size[0]),
        resize=int(tf.resize_size[0]),
        mean=tuple(float(v) for v in tf.mean),
        std=tuple(float(v) for v in tf.std),
        interpolation=tf.interpolation.value,
    )


def torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def _load_imagenet(spec: BackboneSpec) -> nn.Module:
    import torchvision

    if spec.weights is None:
        raise WeightsUnavailableError(
            f"{spec.name} has no ImageNet weights. Use --weights none (random init) or a checkpoint "
            f"from `retrieve train --arch {spec.name}`."
        )
    w = _weights_enum(spec)
    file = Path(w.url).name
    target = torch_home() / "hub" / "checkpoints" / file
    try:
        return torchvision.models.get_model(spec.name, weights=w)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "hash" not in str(exc).lower() and target.exists():
            raise
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name} ({spec.weights}) are not cached and could not be "
            f"downloaded ({type(exc).__name__}: {exc}).\n"
            f"  Place the file {file} at {target}\n"
            f"  (from {w.url}; set TORCH_HOME to use another cache), or use:\n"
            f"  --weights none (random init), --weights CHECKPOINT.pt (from `retrieve train`), "
            f"or --backbone pixels."
        ) from None


def _seeded_build(spec: BackboneSpec, num_classes: int, in_channels: int) -> nn.Module:
    # Random init is seeded so that an index and a later query embed with the same random network.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return spec.builder(num_classes, in_channels)


def feature_nodes(model: nn.Module) -> list[str]:
    """FX node names that `--layer` may tap (eval-mode graph)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model)[1]


def _extractor(model: nn.Module, node: str, spec_name: str) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = feature_nodes(model)
    # A module name like "layer3" is accepted too: it taps the last operation inside that module.
    if node not in nodes and not any(n.startswith(node + ".") for n in nodes):
        raise UnknownNameError(
            f"Layer {node!r} is not a node of {spec_name}. Valid layers: {', '.join(nodes)}."
        )

    class _Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = create_feature_extractor(model, return_nodes={node: "out"})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)["out"]

    return _Tap()


def load_backbone(
    name: str | None = None,
    weights: str | os.PathLike | None = None,
    layer: str | None = None,
) -> Backbone:
    """Build backbone `name` with `weights` ("imagenet", "none" or a checkpoint path), tapping `layer`.

    With a checkpoint, `name` may be omitted (the checkpoint names its architecture); if given it
    must match. The returned module is in eval mode on the CPU.
    """
    from retrieval import checkpoint as ckpt_mod

    weights_str = None if weights is None else str(weights)
    ckpt = None
    if weights_str not in (None, "imagenet", "none"):
        ckpt = ckpt_mod.load_checkpoint(weights_str)
        if name is not None and name != ckpt.arch:
            raise CheckpointError(
                f"Checkpoint {weights_str} is a {ckpt.arch!r} model but --backbone {name} was given; "
                f"drop --backbone or use --backbone {ckpt.arch}."
            )
        name = ckpt.arch
    spec = get_spec(name or DEFAULT_BACKBONE)
    weights_str = weights_str or spec.default_weights

    if spec.builder is None:  # pixels
        if layer:
            raise RetrieveError("The pixels backbone has no layers; drop --layer.")
        if weights_str != "none":  # silently ignoring --weights imagenet would mislabel the index
            raise RetrieveError("The pixels backbone has no weights; drop --weights.")
        return Backbone(
            spec, _Pixels(), spec.preprocess, WeightsInfo("pixels", "pixels", ""), "", spec.dim, None
        )

    classes: tuple[str, ...] = ()
    # Building a model draws its random init from torch's global generator: a library call must not
    # move the caller's random stream (the seeded "none" path forks it the same way).
    if ckpt is not None:
        with torch.random.fork_rng(devices=[]):
            model = spec.builder(ckpt.num_classes, ckpt.in_channels)
        try:
            model.load_state_dict(ckpt.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"Checkpoint {weights_str} does not fit {spec.name}: {first_line(exc)}"
            ) from None
        if not all(torch.isfinite(t).all() for t in ckpt.state_dict.values() if t.is_floating_point()):
            raise CheckpointError(
                f"Checkpoint {weights_str} holds NaN or infinite weights (its training diverged); "
                "its features would be meaningless. Train again with a lower --lr."
            )
        preprocess = ckpt.preprocess
        classes = ckpt.classes
        info = WeightsInfo("checkpoint", Path(weights_str).name, _state_sha256(model))
    elif weights_str == "imagenet":
        with torch.random.fork_rng(devices=[]):
            model = _load_imagenet(spec)
        preprocess = imagenet_preprocess(spec)
        info = WeightsInfo("imagenet", spec.weights or "", _state_sha256(model))
    elif weights_str == "none":
        model = _seeded_build(spec, spec.num_classes, spec.preprocess.channels)
        preprocess = imagenet_preprocess(spec) if spec.weights else spec.preprocess
        info = WeightsInfo("none", "random-init(seed=0)", _state_sha256(model))
    else:
        raise RetrieveError(f"Unknown weights {weights_str!r}: use imagenet, none, or a checkpoint path.")

    model.eval()
    node = layer or spec.node
    extractor = _extractor(model, node, spec.name).eval()
    with torch.inference_mode():
        probe = torch.zeros(1, preprocess.channels, preprocess.size, preprocess.size)
        out = extractor(probe)
    dim = int(out.shape[1]) if out.ndim == 4 else int(out[0].numel())
    if layer is None and dim != spec.dim:
        raise RetrieveError(f"{spec.name}: layer {node} gives {dim}-d vectors, registry says {spec.dim}")
    return Backbone(spec, extractor, preprocess, info, node, dim, model, classes)
