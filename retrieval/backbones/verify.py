"""Checks that a tap is what the registry says: its layer exists and a probe pass gives the registered dim."""

from __future__ import annotations

import torch
from torch import nn

from retrieval.backbones.extractor import feature_nodes
from retrieval.backbones.spec import BackboneSpec
from retrieval.errors import RetrieveError, UnknownNameError
from retrieval.preprocess import Preprocess


def check_layer(model: nn.Module, node: str, spec_name: str) -> None:
    """Raise, listing the valid layers, unless `node` names an FX node (or a module) of `model`."""
    nodes = feature_nodes(model)
    # A module name like "layer3" is accepted too: it taps the last operation inside that module.
    if node not in nodes and not any(n.startswith(node + ".") for n in nodes):
        raise UnknownNameError(
            f"Layer {node!r} is not a node of {spec_name}. Valid layers: {', '.join(nodes)}."
        )


def probe_dim(extractor: nn.Module, preprocess: Preprocess) -> int:
    """Vector length the extractor gives for one blank input (a spatial map counts its channels)."""
    with torch.inference_mode():
        probe = torch.zeros(1, preprocess.channels, preprocess.size, preprocess.size)
        out = extractor(probe)
    return int(out.shape[1]) if out.ndim == 4 else int(out[0].numel())


def check_dim(spec: BackboneSpec, node: str, dim: int, layer: str | None) -> None:
    """The registered layer must give the registered dimension (another `layer` gives what it gives)."""
    if layer is None and dim != spec.dim:
        raise RetrieveError(f"{spec.name}: layer {node} gives {dim}-d vectors, registry says {spec.dim}")
