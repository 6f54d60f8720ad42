"""The loaded feature extractor: the Backbone module, FX taps of a layer, and the pixel baseline."""

from __future__ import annotations

import torch
from torch import nn

from retrieval.backbones.spec import BackboneSpec
from retrieval.backbones.weights import WeightsInfo
from retrieval.preprocess import Preprocess


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


class Pixels(nn.Module):
    """The pixel baseline's extractor: the preprocessed image, flattened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def feature_nodes(model: nn.Module) -> list[str]:
    """FX node names that `--layer` may tap (eval-mode graph)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model)[1]


class Tap(nn.Module):
    """The output of one FX node of `model` (torchvision's create_feature_extractor, not slicing)."""

    def __init__(self, model: nn.Module, node: str) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        self.body = create_feature_extractor(model, return_nodes={node: "out"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)["out"]
