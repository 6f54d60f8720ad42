"""See what a convnet learned: filters, saliency (guided backprop, Grad-CAM), dreams, activations, top patches."""

from __future__ import annotations

from retrieval.visualise.dream import DreamConfig, DreamResult, dream
from retrieval.visualise.features import (
    ActivationGrid,
    FilterGrid,
    Patch,
    TopPatches,
    activations,
    filters,
    receptive_boxes,
    top_patches,
)
from retrieval.visualise.probe import (
    GuidedGELU,
    GuidedReLU,
    Probe,
    Target,
    conv_layers,
    layer_aliases,
    layer_choices,
    resolve_layer,
)
from retrieval.visualise.saliency import (
    METHODS,
    Saliency,
    SaliencyConfig,
    SaliencyMaps,
    SaliencyRun,
    default_cam_layer,
    saliency,
    saliency_folder,
)
from retrieval.visualise.source import VizModel, load_model

__all__ = [
    "METHODS",
    "ActivationGrid",
    "DreamConfig",
    "DreamResult",
    "FilterGrid",
    "GuidedGELU",
    "GuidedReLU",
    "Patch",
    "Probe",
    "Saliency",
    "SaliencyConfig",
    "SaliencyMaps",
    "SaliencyRun",
    "Target",
    "TopPatches",
    "VizModel",
    "activations",
    "conv_layers",
    "default_cam_layer",
    "dream",
    "filters",
    "layer_aliases",
    "layer_choices",
    "load_model",
    "receptive_boxes",
    "resolve_layer",
    "saliency",
    "saliency_folder",
    "top_patches",
]
