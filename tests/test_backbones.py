"""The registry: every spec builds with weights=None, its node exists, its dimension is right."""

from __future__ import annotations

import ast
import urllib.error
from pathlib import Path

import pytest
import torch

from retrieval.backbones import (
    BackboneSpec,
    feature_nodes,
    fold_transform_input,
    get_spec,
    imagenet_preprocess,
    list_backbones,
    load_backbone,
    load_imagenet,
    register,
)
from retrieval.errors import UnknownNameError, WeightsUnavailableError
from retrieval.preprocess import Preprocess

REQUIRED = {
    "pixels": 3072,
    "lenet": 84,
    "alexnet": 4096,
    "vgg11": 4096,
    "vgg13": 4096,
    "vgg16": 4096,
    "vgg19": 4096,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "googlenet": 1024,
}


def test_required_backbones_are_registered_with_their_dims() -> None:
    for name, dim in REQUIRED.items():
        assert get_spec(name).dim == dim, name


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_node_exists_and_dim_is_right(name: str) -> None:
    spec = get_spec(name)
    b = load_backbone(name, "none")
    pre = b.preprocess
    if spec.builder is not None:
        assert spec.node in feature_nodes(b.model)
    x = torch.rand(2, pre.channels, pre.size, pre.size)
    with torch.inference_mode():
        out = b(x)
    assert out.shape == (2, spec.dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if spec.node.startswith("classifier.") and name != "lenet":
        # FC7 is tapped after its ReLU: no negative activations.
        assert (out >= 0).all()


def test_fc7_nodes_follow_the_architectures() -> None:
    # FC7 after ReLU is classifier.5 in AlexNet but classifier.4 in VGG.
    assert get_spec("alexnet").node == "classifier.5"
    assert get_spec("vgg16").node == "classifier.4"
    alex = load_backbone("alexnet", "none").model
    assert isinstance(alex.get_submodule("classifier.5"), torch.nn.ReLU)
    assert isinstance(alex.get_submodule("classifier.4"), torch.nn.Linear)


def test_random_init_is_deterministic_and_hashed() -> None:
    a, b = load_backbone("resnet18", "none"), load_backbone("resnet18", "none")
    assert a.weights.sha256 == b.weights.sha256 and len(a.weights.sha256) == 64
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x))


def test_other_layer_is_tapped_and_pooled() -> None:
    b = load_backbone("resnet18", "none", layer="layer3")
    assert b.dim == 256
    with pytest.raises(UnknownNameError, match=r"Valid layers: .*layer4"):
        load_backbone("resnet18", "none", layer="layer9")


def test_unknown_and_duplicate_names() -> None:
    with pytest.raises(UnknownNameError, match="Known backbones: pixels, lenet"):
        get_spec("resnet9000")
    with pytest.raises(ValueError, match="already registered"):
        register(BackboneSpec(name="resnet18", builder=None, node="", dim=1, preprocess=Preprocess(1, 1)))


def test_imagenet_preprocessing_comes_from_the_weights() -> None:
    pre = imagenet_preprocess(get_spec("resnet50"))
    assert (pre.size, pre.resize) == (224, 232)  # IMAGENET1K_V2 resizes to 232, not 256
    assert imagenet_preprocess(get_spec("vgg16")).resize == 256


def test_offline_imagenet_weights_give_an_actionable_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("resnet18", "imagenet")
    msg = info.value.for_cli()  # as the command line says it: settings shown as flags
    assert "resnet18-f37072fd.pth" in msg and "hub/checkpoints" in msg
    assert "--weights none" in msg and "--backbone pixels" in msg
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights"):
        load_backbone("lenet", "imagenet")


@pytest.mark.parametrize("name", [n for n in list_backbones() if get_spec(n).fixed_size is not None])
def test_fixed_size_is_the_only_input_side_the_network_takes(name: str) -> None:
    spec = get_spec(name)
    side = spec.fixed_size
    assert spec.preprocess.size == side
    model = spec.builder(10, 3).eval()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, side, side)).shape == (1, 10)
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, side + 4, side + 4))


def test_transform_input_is_switched_on_by_the_imagenet_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import GoogLeNet, WeightsEnum

    spec = get_spec("googlenet")
    # The state dict torchvision's ImageNet GoogLeNet loads, without downloading it.
    fake = GoogLeNet(aux_logits=True, init_weights=False).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: fake)
    assert spec.transform_input and load_imagenet(spec).transform_input
    assert [n for n in list_backbones() if get_spec(n).transform_input] == ["googlenet"]


def test_folding_transform_input_into_the_preprocessing_is_equal_maths() -> None:
    from torchvision.models import GoogLeNet

    torch.manual_seed(0)
    model = GoogLeNet(transform_input=True, aux_logits=False, init_weights=True).eval()
    pre = imagenet_preprocess(get_spec("googlenet"))
    x = torch.rand(2, 3, 64, 64)

    def normalise(p: Preprocess) -> torch.Tensor:
        return (x - torch.tensor(p.mean)[:, None, None]) / torch.tensor(p.std)[:, None, None]

    with torch.inference_mode():
        before = model(normalise(pre))
        folded = fold_transform_input(model, pre)
        after = model(normalise(folded))
    assert not model.transform_input and (folded.size, folded.resize) == (pre.size, pre.resize)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def _imports(path: Path) -> set[str]:
    """Every module that a file imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_backbones_import_checkpoint_and_models_never_the_reverse() -> None:
    root = Path(__file__).resolve().parents[1] / "retrieval"
    below = [root / "checkpoint.py", *sorted((root / "models").glob("*.py"))]
    for path in below:
        assert not any(n.startswith("retrieval.backbones") for n in _imports(path)), path
    above = ("images", "store", "index", "embed", "cli", "visualise", "train", "api")
    for path in sorted((root / "backbones").glob("*.py")):
        found = {n for n in _imports(path) if n.startswith(("retrieval.", "pipelines"))}
        bad = {n for n in found if n.startswith("pipelines") or n.split(".")[1] in above}
        assert not bad, f"{path.name} imports {sorted(bad)}"
