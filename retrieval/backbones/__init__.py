"""The backbone registry: one frozen spec per name, and loading a spec's weights into a feature extractor."""

# spec: BackboneSpec and the registry; catalog: the registered entries; weights: ImageNet, checkpoint
# and random weights and their hash; extractor: the Backbone module and FX taps; verify: layer and
# dimension checks; load: load_backbone, which puts them together. Each imports only those before it.

from retrieval.backbones.catalog import DEFAULT_BACKBONE
from retrieval.backbones.extractor import Backbone, feature_nodes
from retrieval.backbones.load import load_backbone
from retrieval.backbones.spec import BackboneSpec, get_spec, list_backbones, register
from retrieval.backbones.weights import (
    WeightsInfo,
    fold_transform_input,
    imagenet_classes,
    imagenet_preprocess,
    load_imagenet,
    torch_home,
)
from retrieval.preprocess import Preprocess

# Preprocess is re-exported: callers from before retrieval/preprocess.py took it from here.

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "BackboneSpec",
    "Preprocess",
    "WeightsInfo",
    "feature_nodes",
    "fold_transform_input",
    "get_spec",
    "imagenet_classes",
    "imagenet_preprocess",
    "list_backbones",
    "load_backbone",
    "load_imagenet",
    "register",
    "torch_home",
]
