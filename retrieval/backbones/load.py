"""load_backbone: a registered spec, its weights and a tap of one layer, assembled and checked."""

from __future__ import annotations

import os

from retrieval.backbones.catalog import DEFAULT_BACKBONE
from retrieval.backbones.extractor import Backbone, Pixels, Tap
from retrieval.backbones.spec import BackboneSpec, get_spec
from retrieval.backbones.verify import check_dim, check_layer, probe_dim
from retrieval.backbones.weights import WeightsInfo, load_weights
from retrieval.checkpoint import Checkpoint, load_checkpoint
from retrieval.errors import CheckpointError, RetrieveError


def load_backbone(
    name: str | None = None,
    weights: str | os.PathLike | None = None,
    layer: str | None = None,
) -> Backbone:
    """Build backbone `name` with `weights` ("imagenet", "none" or a checkpoint path), tapping `layer`.

    With a checkpoint, `name` may be omitted (the checkpoint names its architecture); if given it
    must match. The returned module is in eval mode on the CPU.
    """
    weights_str = None if weights is None else str(weights)
    ckpt = None
    if weights_str not in (None, "imagenet", "none"):
        ckpt = _read_checkpoint(weights_str, name)
        name = ckpt.arch
    spec = get_spec(name or DEFAULT_BACKBONE)
    weights_str = weights_str or spec.default_weights

    if spec.builder is None:  # pixels
        return _pixels(spec, weights_str, layer)

    loaded = load_weights(spec, weights_str, ckpt)
    model = loaded.model
    model.eval()
    node = layer or spec.node
    check_layer(model, node, spec.name)
    extractor = Tap(model, node).eval()
    dim = probe_dim(extractor, loaded.preprocess)
    check_dim(spec, node, dim, layer)
    return Backbone(spec, extractor, loaded.preprocess, loaded.info, node, dim, model, loaded.classes)


def _read_checkpoint(path: str, name: str | None) -> Checkpoint:
    """The checkpoint at `path`; a `name` given beside it must be the architecture it records."""
    ckpt = load_checkpoint(path)
    if name is not None and name != ckpt.arch:
        raise CheckpointError(
            f"Checkpoint {path} is a {ckpt.arch!r} model but «backbone» {name} was given; "
            f"drop «backbone» or use «backbone» {ckpt.arch}."
        )
    return ckpt


def _pixels(spec: BackboneSpec, weights: str, layer: str | None) -> Backbone:
    """The pixel baseline, which has neither layers nor weights to choose."""
    if layer:
        raise RetrieveError("The pixels backbone has no layers; drop «layer».")
    if weights != "none":  # silently ignoring --weights imagenet would mislabel the index
        raise RetrieveError("The pixels backbone has no weights; drop «weights».")
    return Backbone(spec, Pixels(), spec.preprocess, WeightsInfo("pixels", "pixels", ""), "", spec.dim, None)
