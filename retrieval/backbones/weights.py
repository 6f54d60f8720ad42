"""A spec's weights: torchvision ImageNet (TORCH_HOME cache), checkpoint or seeded random, and their hash."""

from __future__ import annotations

import hashlib
import os
import urllib.error
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.backbones.spec import BackboneSpec
from retrieval.checkpoint import Checkpoint
from retrieval.errors import CheckpointError, RetrieveError, WeightsUnavailableError, first_line
from retrieval.preprocess import Preprocess


@dataclass(frozen=True)
class WeightsInfo:
    """What the manifest records about the weights a backbone was loaded with."""

    kind: str  # "imagenet", "none", "checkpoint", "pixels"
    id: str  # enum entry, "random-init(seed=0)", or the checkpoint file name
    sha256: str  # of the state dict (tensors in key order), so any change of weights is caught


@dataclass(frozen=True)
class LoadedWeights:
    """A network with its weights in place, and what travels with them."""

    model: nn.Module
    preprocess: Preprocess
    info: WeightsInfo
    classes: tuple[str, ...] = ()  # class names when the weights know them (a checkpoint)


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of the state dict: key names and tensor bytes, in sorted key order."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_enum(spec: BackboneSpec) -> Any:
    """The torchvision weights enum entry that `spec.weights` names."""
    import torchvision

    enum_name, _, entry = spec.weights.partition(".")
    return torchvision.models.get_weight(spec.weights) if entry else getattr(torchvision, enum_name)


def imagenet_preprocess(spec: BackboneSpec) -> Preprocess:
    """The preprocessing that travels with the torchvision weights (resize, crop, mean, std)."""
    if spec.weights is None or spec.packaged is not None:
        return spec.preprocess  # a packaged file's preprocessing is the registry's
    tf = weights_enum(spec).transforms()
    return Preprocess(
        size=int(tf.crop_size[0]),
        resize=int(tf.resize_size[0]),
        mean=tuple(float(v) for v in tf.mean),
        std=tuple(float(v) for v in tf.std),
        interpolation=tf.interpolation.value,
    )


def imagenet_classes(spec: BackboneSpec) -> tuple[str, ...]:
    """The 1,000 ImageNet class names in the order of the ImageNet weights' logits."""
    import torchvision

    # Packaged weights use the standard ILSVRC-2012 order, which every torchvision enum lists.
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if spec.packaged else weights_enum(spec)
    return tuple(enum.meta["categories"])


def torch_home() -> Path:
    """torchvision's download cache: $TORCH_HOME, else ~/.cache/torch."""
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def load_imagenet(spec: BackboneSpec) -> nn.Module:
    """The network with its ImageNet weights, from torchvision's cache or an installed package;
    offline without the file is a clear error."""
    import torchvision

    if spec.weights is None:
        raise WeightsUnavailableError(
            f"{spec.name} has no ImageNet weights. Use «weights» none (random init) or a checkpoint "
            f"from `retrieve train --arch {spec.name}`."
        )
    if spec.packaged is not None:
        from retrieval.backbones.packaged import load_packaged

        return load_packaged(spec, spec.builder(spec.num_classes, 3))
    w = weights_enum(spec)
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
            f"  «weights» none (random init), «weights» CHECKPOINT.pt (from `retrieve train`), "
            f"or «backbone» pixels."
        ) from None


def fold_transform_input(model: nn.Module, preprocess: Preprocess) -> Preprocess:
    """Switch off the model's own input re-normalisation (`spec.transform_input`) and return the
    Preprocess that gives the same maths without it.

    torchvision's ImageNet GoogLeNet turns ImageNet-normalised input into input normalised with
    mean = std = 0.5 inside the model; a network rebuilt from the registry's builder (a checkpoint)
    lacks that flag, so the recorded normalisation must do it instead.
    """
    model.transform_input = False
    return replace(preprocess, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def seeded_build(spec: BackboneSpec, num_classes: int, in_channels: int) -> nn.Module:
    """The spec's network with random weights drawn from seed 0, leaving the caller's stream alone."""
    # Random init is seeded so that an index and a later query embed with the same random network.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return spec.builder(num_classes, in_channels)


def checkpoint_model(spec: BackboneSpec, ckpt: Checkpoint, source: str) -> nn.Module:
    """The spec's network with the weights of `ckpt` (read from `source`), which must fit and be finite."""
    with torch.random.fork_rng(devices=[]):
        model = spec.builder(ckpt.num_classes, ckpt.in_channels)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint {source} does not fit {spec.name}: {first_line(exc)}") from None
    if not all(torch.isfinite(t).all() for t in ckpt.state_dict.values() if t.is_floating_point()):
        raise CheckpointError(
            f"Checkpoint {source} holds NaN or infinite weights (its training diverged); "
            "its features would be meaningless. Train again with a lower «lr»."
        )
    return model


def load_weights(spec: BackboneSpec, weights: str, ckpt: Checkpoint | None) -> LoadedWeights:
    """Build `spec`'s network with `weights` ("imagenet", "none", or the path `ckpt` was read from)."""
    # Building a model draws its random init from torch's global generator: a library call must not
    # move the caller's random stream (the seeded "none" path forks it the same way).
    if ckpt is not None:
        model = checkpoint_model(spec, ckpt, weights)
        info = WeightsInfo("checkpoint", Path(weights).name, state_sha256(model))
        return LoadedWeights(model, ckpt.preprocess, info, ckpt.classes)
    if weights == "imagenet":
        with torch.random.fork_rng(devices=[]):
            model = load_imagenet(spec)
        info = WeightsInfo("imagenet", spec.weights or "", state_sha256(model))
        return LoadedWeights(model, imagenet_preprocess(spec), info)
    if weights == "none":
        model = seeded_build(spec, spec.num_classes, spec.preprocess.channels)
        preprocess = imagenet_preprocess(spec) if spec.weights else spec.preprocess
        info = WeightsInfo("none", "random-init(seed=0)", state_sha256(model))
        return LoadedWeights(model, preprocess, info)
    raise RetrieveError(f"Unknown weights {weights!r}: use imagenet, none, or a checkpoint path.")
