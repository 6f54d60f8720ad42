"""`retrieve viz`: guided backprop against hand-derived gradients, Grad-CAM and receptive fields against slow
references, gradient ascent on trained nets, flat memory over 200 batches, escaped reports, and the CLI."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from retrieval.checkpoint import Checkpoint, save_checkpoint
from retrieval.cli import app
from retrieval.device import resolve_runtime
from retrieval.errors import RetrieveError, UnknownNameError
from retrieval.images import Transform, load_tensor, scan
from retrieval.models import LeNet5
from retrieval.preprocess import Preprocess
from retrieval.samples import SampleConfig, make_samples
from retrieval.visualise import (
    DreamConfig,
    Probe,
    Saliency,
    SaliencyConfig,
    Target,
    VizModel,
    activations,
    dream,
    filters,
    load_model,
    receptive_boxes,
    resolve_layer,
    saliency_folder,
    top_patches,
)
from retrieval.visualise.render import normalise01

CPU = resolve_runtime("cpu", "float32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# Fixtures: a shapes data set and LeNets trained on it for a moment, saved as real checkpoints


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes x 16 images of 32 px."""
    root = make_samples(
        tmp_path_factory.mktemp("shapes"), SampleConfig(per_class=16, test_per_class=0, size=32)
    )
    return root / "train"


def _train(model: nn.Module, pre: Preprocess, shapes: Path) -> tuple[nn.Module, tuple[str, ...]]:
    """A few hundred Adam steps on the shapes: enough to give the net real class structure."""
    torch.manual_seed(pre.channels)
    entries, _ = scan(shapes)
    classes = tuple(sorted({e.label for e in entries}))
    tf = Transform(pre)
    x = torch.stack([tf.normalize(load_tensor(e.path, tf)[0]) for e in entries])
    y = torch.tensor([classes.index(e.label) for e in entries])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):  # a fixed number of epochs, not seconds: same net however loaded the machine is
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 16):
            idx = perm[i : i + 16]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.6, f"the test net did not learn ({accuracy:.2f}); the fixture is broken"
    return model, classes


def _grey_pre(size: int, channels: int) -> Preprocess:
    return Preprocess(
        size=size, resize=size, squash=True, mean=(0.5,) * channels, std=(0.5,) * channels, channels=channels
    )


@pytest.fixture(scope="module")
def checkpoints(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """LeNet-5 trained on 1- and 3-channel 32 px shapes, saved as `retrieve train` checkpoints."""
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for ch in (1, 3):
        pre = _grey_pre(32, ch)
        torch.manual_seed(ch)  # the initial weights too: the same nets on every run
        model, classes = _train(LeNet5(num_classes=8, in_channels=ch), pre, shapes)
        ckpt = Checkpoint("lenet", model.state_dict(), classes, pre, len(classes), ch)
        paths[ch] = save_checkpoint(ckpt, out / f"lenet{ch}.pt")
    return paths


@pytest.fixture(scope="module")
def net28(shapes: Path) -> VizModel:
    """An MNIST-style 28 px grey convnet (not in the registry): the Python API takes any module."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 8),
    )
    pre = _grey_pre(28, 1)
    model, classes = _train(net, pre, shapes)
    return VizModel(model, pre, classes, "net28")


@pytest.fixture(scope="module")
def few_images(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """13 images in 4 class folders (13 is no multiple of the batch sizes used)."""
    root = tmp_path_factory.mktemp("few")
    for label in ("circle", "square", "star", "ring"):
        (root / label).mkdir()
        for src in sorted((shapes / label).iterdir())[: 4 if label != "ring" else 1]:
            (root / label / src.name).write_bytes(src.read_bytes())
    return root


# --------------------------------------------------------------------------------------------
# Guided backprop against a hand-derived oracle

# x (3) -> Linear -> ReLU -> Linear -> ReLU -> Linear -> 2 logits, with weights chosen so that the
# guided rule matters at both ReLUs: a positive unit with a negative upstream gradient (guided
# zeroes it, plain backprop keeps it) and a negative unit (both zero it).
W1 = np.array([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
B1 = np.array([0.0, 0.5, -0.5, -2.0])
W2 = np.array([[1.0, -2.0, 0.5, 1.0], [-1.0, 1.0, 2.0, 0.5], [0.5, 0.5, -1.0, 1.0]])
B2 = np.array([0.5, 0.0, 0.25])
W3 = np.array([[2.0, -1.0, 1.0], [-1.0, 1.0, 0.5]])
X = np.array([1.0, 0.5, 0.25])


def _hand_guided_gradient(target: int) -> tuple[np.ndarray, np.ndarray]:
    """(guided, plain) d logit[target] / dx, derived step by step."""
    h1 = W1 @ X + B1  # [0.625, 1.25, -1, -0.25]: units 2 and 3 are off
    a1 = np.maximum(h1, 0)
    h2 = W2 @ a1 + B2  # [-1.375, 0.625, 1.1875]: unit 0 is off
    g_a2 = W3[target]  # target 0: [2, -1, 1]
    g_h2 = g_a2 * (h2 > 0) * (g_a2 > 0)  # guided: [0, 0, 1] (unit 1 has a negative gradient)
    g_a1 = W2.T @ g_h2  # [0.5, 0.5, -1, 1]
    g_h1 = g_a1 * (h1 > 0) * (g_a1 > 0)  # [0.5, 0.5, 0, 0]
    # plain: g_h2 = [0, -1, 1], W2.T @ g_h2 = [1.5, -0.5, -3, 0.5], masked by h1 > 0: [1.5, -0.5, 0, 0]
    plain_h2 = g_a2 * (h2 > 0)
    plain_h1 = (W2.T @ plain_h2) * (h1 > 0)
    return W1.T @ g_h1, W1.T @ plain_h1


class _Functional(nn.Module):
    """The same network with functional, in-place ReLUs (as torchvision's GoogLeNet writes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)), inplace=True)
        return self.fc3(torch.relu(self.fc2(x)))


def _hand_net(functional: bool) -> nn.Module:
    if functional:
        net = _Functional()
        fc1, fc2, fc3 = net.fc1, net.fc2, net.fc3
    else:
        fc1, fc2, fc3 = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 2, bias=False)
        net = nn.Sequential(nn.Flatten(1), fc1, nn.ReLU(inplace=True), fc2, nn.ReLU(inplace=True), fc3)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor(W1))
        fc1.bias.copy_(torch.tensor(B1))
        fc2.weight.copy_(torch.tensor(W2))
        fc2.bias.copy_(torch.tensor(B2))
        fc3.weight.copy_(torch.tensor(W3))
    return net.eval()


@pytest.mark.parametrize("functional", [False, True], ids=["nn.ReLU-inplace", "F.relu-inplace"])
def test_guided_backprop_matches_hand_derived_gradients(functional: bool) -> None:
    net = _hand_net(functional)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.tensor(X, dtype=torch.float32).view(1, 3, 1, 1)
    guided_expected, plain_expected = _hand_guided_gradient(0)
    # Worked by hand from the comments above: W1.T @ [0.5, 0.5, 0, 0] and W1.T @ [1.5, -0.5, 0, 0].
    np.testing.assert_allclose(guided_expected, [0.75, 0.0, -0.25])
    np.testing.assert_allclose(plain_expected, [1.25, -2.0, 1.25])

    guided = Saliency(net, "guided", Target.of_class(0), runtime=CPU)(x)
    plain = Saliency(net, "vanilla", Target.of_class(0), runtime=CPU)(x)
    np.testing.assert_allclose(guided.gradients.flatten().numpy(), guided_expected, atol=1e-6)
    np.testing.assert_allclose(plain.gradients.flatten().numpy(), plain_expected, atol=1e-6)
    # The other logit exercises the other branch of the rule.
    guided1 = Saliency(net, "guided", Target.of_class(1), runtime=CPU)(x)
    np.testing.assert_allclose(guided1.gradients.flatten().numpy(), _hand_guided_gradient(1)[0], atol=1e-6)
    # The caller's model is never touched: same modules, flags, weights and requires_grad.
    if not functional:
        assert [type(m) for m in net] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
        assert net[2].inplace and net[4].inplace
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_vanilla_and_batched_saliency_equal_plain_autograd_per_image(checkpoints: dict[int, Path]) -> None:
    vm = load_model(weights=checkpoints[3])
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batched = Saliency(vm.model, "vanilla", runtime=CPU)(x)
    guided_engine = Saliency(vm.model, "guided", runtime=CPU)
    guided_batched = guided_engine(x)
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        logits = vm.model(xi)
        cls = int(logits.argmax())
        (g,) = torch.autograd.grad(logits[0, cls], xi)
        assert int(batched.chosen[i]) == cls
        torch.testing.assert_close(batched.gradients[i], g[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(guided_batched.gradients[i], guided_engine(x[i : i + 1]).gradients[0])


def _slow_gradcam(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Grad-CAM the obvious way: one image at a time, a forward hook on the original model."""
    maps = []
    store: dict[str, torch.Tensor] = {}
    for i in range(len(x)):
        handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
        try:
            logits = model(x[i : i + 1])
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(logits[0, logits.argmax()], store["a"])
        cam = F.relu((grad.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        assert cam.max() > 0, "a blank Grad-CAM would test nothing: choose other images"
        maps.append(cam / cam.max())
    return torch.stack(maps).detach()


def test_gradcam_equals_slow_reference_and_default_layer(
    checkpoints: dict[int, Path], few_images: Path
) -> None:
    vm = load_model(weights=checkpoints[1])
    # Real images the net knows, not noise: their Grad-CAMs for the predicted class are not blank.
    tf = Transform(vm.preprocess)
    x = torch.stack([tf.normalize(load_tensor(e.path, tf)[0]) for e in scan(few_images)[0][:4]])
    engine = Saliency(vm.model, "gradcam", runtime=CPU)
    maps = engine(x)
    assert engine.cam_layer == "features.5"  # the last map bigger than 1x1 (pool2, 5x5)
    torch.testing.assert_close(
        maps.cam, _slow_gradcam(vm.model, x, vm.model.features[5]), atol=1e-5, rtol=1e-4
    )
    guided_cam = Saliency(vm.model, "guided-gradcam", cam_layer="conv2", runtime=CPU)(x)
    guided = Saliency(vm.model, "guided", runtime=CPU)(x)
    torch.testing.assert_close(guided_cam.gradients, guided.gradients * guided_cam.cam[:, None])


def test_unit_target_is_one_hot_at_the_strongest_neuron(checkpoints: dict[int, Path]) -> None:
    vm = load_model(weights=checkpoints[3])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    maps = Saliency(vm.model, "vanilla", Target.unit("conv2", 4), runtime=CPU)(x)
    store: dict[str, torch.Tensor] = {}
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        handle = vm.model.features[3].register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
        try:
            vm.model(xi)
        finally:
            handle.remove()
        unit = store["a"][0, 4]
        (g,) = torch.autograd.grad(unit.max(), xi)
        assert float(maps.scores[i]) == pytest.approx(float(unit.max().detach()), rel=1e-5)
        torch.testing.assert_close(maps.gradients[i], g[0], atol=1e-5, rtol=1e-4)
    # A fully connected layer's unit: the neuron itself, no spatial map.
    fc = Saliency(vm.model, "vanilla", Target.unit("classifier.1", 9), runtime=CPU)(x)
    xi = x.clone().requires_grad_(True)
    hidden = vm.model.classifier[:2](vm.model.flatten(vm.model.features(xi)))[:, 9]
    (g,) = torch.autograd.grad(hidden.sum(), xi)
    torch.testing.assert_close(fc.gradients, g, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fc.scores, hidden.detach())
    fixed = Saliency(vm.model, "vanilla", Target.unit("conv2", 4, neuron=(2, 3)), runtime=CPU)(x)
    assert fixed.gradients[:, :, :4, :].abs().sum() == 0  # the unit at row 2 sees input rows 4..17 only
    assert fixed.gradients[:, :, 4:18, 6:20].abs().sum() > 0


def _random_batchnorm(model: nn.Module, channels: int) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, so folding them is really tested."""
    torch.manual_seed(5)
    with torch.no_grad():
        model.train()(torch.randn(8, channels, 32, 32) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _autograd_saliency(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Vanilla saliency the obvious way: one image at a time through the untouched model."""
    grads = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        logits = model(xi)
        (g,) = torch.autograd.grad(logits[0, logits.argmax()], xi)
        grads.append(g[0])
    return torch.stack(grads)


def test_torchvision_inplace_relus_and_model_untouched() -> None:
    import torchvision

    model = _random_batchnorm(torchvision.models.resnet18(num_classes=10), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    maps = Saliency(model, "guided-gradcam", runtime=CPU)(x)
    assert maps.gradients.shape == (2, 3, 64, 64) and torch.isfinite(maps.gradients).all()
    # Batch norms are folded into the convs of the traced copy: same gradients as the model itself.
    vanilla = Saliency(model, "vanilla", runtime=CPU)(x).gradients
    torch.testing.assert_close(vanilla, _autograd_saliency(model, x), atol=1e-5, rtol=1e-3)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_one_channel_small_resnet_checkpoint(tmp_path: Path, few_images: Path) -> None:
    """A registry ResNet trained on grey images, saved as `retrieve train` leaves it (run folder)."""
    from retrieval.backbones import get_spec

    model = _random_batchnorm(get_spec("resnet8_small").builder(8, 1), 1)
    classes = ("arrow", "circle", "cross", "ring", "square", "star", "triangle", "wave")
    ckpt = Checkpoint("resnet8_small", model.state_dict(), classes, _grey_pre(32, 1), 8, 1)
    save_checkpoint(ckpt, tmp_path / "run" / "best.pt")
    vm = load_model(weights=tmp_path / "run")
    assert vm.channels == 1 and vm.classes == classes
    grid = filters(vm.model)
    assert (grid.mode, grid.count, grid.shape, grid.image.shape[-1]) == ("grey", 32, (1, 3, 3), 1)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(7))
    vanilla = Saliency(vm.model, "vanilla", runtime=CPU)(x).gradients
    torch.testing.assert_close(vanilla, _autograd_saliency(vm.model, x), atol=1e-5, rtol=1e-3)
    run = saliency_folder(vm, few_images, tmp_path / "sal", SaliencyConfig(method="gradcam", batch_size=8))
    assert (run.images, run.cam_layer) == (13, "layer3")
    acts = activations(vm, next((few_images / "star").iterdir()), "layer2", device="cpu")
    assert acts.maps.shape == (64, 16, 16)


# --------------------------------------------------------------------------------------------
# Gradient ascent


@pytest.mark.parametrize(
    ("net", "param"),
    [("lenet1", "pixel"), ("lenet3", "pixel"), ("lenet3", "fft"), ("net28", "pixel"), ("net28", "fft")],
)
def test_dream_raises_class_score_tenfold(
    checkpoints: dict[int, Path], net28: VizModel, net: str, param: str
) -> None:
    vm = net28 if net == "net28" else load_model(weights=checkpoints[int(net[-1])])
    c, size = vm.channels, vm.preprocess.size
    with torch.no_grad():
        logits = vm.model(torch.zeros(1, c, size, size))  # the zeros init is the mean image
    # The hardest class: the one the starting image already scores highest on.
    cls = int(logits.argmax())
    assert float(logits[0, cls]) > 0
    result = dream(vm, Target.of_class(cls), DreamConfig(steps=120, init="zeros", param=param))
    if param == "pixel":
        assert result.start_score == pytest.approx(float(logits[0, cls]), abs=1e-5)
    assert result.final_score >= 10 * result.start_score, (result.start_score, result.final_score)
    assert result.image.shape == (size, size, c) and result.image.dtype == np.uint8
    # The returned picture is what scored: re-normalise it and score it again (8-bit rounding aside).
    x = (torch.from_numpy(result.image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert float(vm.model(x[None])[0, cls]) == pytest.approx(result.final_score, rel=0.05)


def test_dream_on_a_unit(checkpoints: dict[int, Path], net28: VizModel) -> None:
    vm = load_model(weights=checkpoints[3])
    with torch.no_grad():
        conv3 = vm.model.features[:7](torch.zeros(1, 3, 32, 32))[0, :, 0, 0]  # 120 units of a 1x1 map
    channel = int(conv3.argmax())  # the hardest: the unit the mean image already excites most
    assert float(conv3[channel]) > 0
    result = dream(vm, Target.unit("conv3", channel), DreamConfig(steps=80, init="zeros"))
    assert result.start_score == pytest.approx(float(conv3[channel]), abs=1e-5)
    assert result.final_score >= 10 * result.start_score, (result.start_score, result.final_score)
    grey = dream(net28, Target.unit("conv2", 3, neuron=(4, 4)), DreamConfig(steps=80, param="fft"))
    assert grey.image.shape == (28, 28, 1) and grey.final_score > grey.start_score + 1.0
    with pytest.raises(RetrieveError, match="class"):
        dream(vm, Target.predicted())


def test_dream_regularisers_act(checkpoints: dict[int, Path]) -> None:
    vm = load_model(weights=checkpoints[3])
    base = {"steps": 12, "jitter": 0, "blur_every": 0, "clip_percentile": 0.0}

    def run(**kw: object) -> np.ndarray:
        return dream(vm, Target.of_class(2), DreamConfig(**{**base, **kw})).image  # type: ignore[arg-type]

    def at_mean(img: np.ndarray) -> float:  # pixels exactly at the mean colour (0.5 -> 128)
        return float((img == 128).all(-1).mean())

    def roughness(img: np.ndarray) -> float:
        a = img.astype(np.float64) / 255
        return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())

    plain = run()
    assert at_mean(plain) < 0.02
    # Clipping: at each blur (every 4th step, the last included) the 30% weakest pixels become the mean.
    assert at_mean(run(blur_every=4, clip_percentile=30.0)) >= 0.29
    # Blur every step smooths the image.
    assert roughness(run(blur_every=1, blur_sigma=1.0)) < 0.7 * roughness(plain)

    # L2 decay pulls the image towards the mean.
    def spread(img: np.ndarray) -> float:
        return float(np.abs(img.astype(np.float64) / 255 - 0.5).mean())

    assert spread(run(l2=2000.0)) < 0.5 * spread(plain)
    # Jitter changes the path (a shifted input each step) but not what is optimised.
    jittered = run(jitter=3)
    assert jittered.shape == plain.shape and not np.array_equal(jittered, plain)


@pytest.fixture(scope="module")
def vgg() -> VizModel:
    """A registry VGG (random weights: none can be downloaded here), shared by the tests that need one."""
    return load_model("vgg11", "none")


def test_registry_vgg_filters_saliency_dream(vgg: VizModel) -> None:
    grid = filters(vgg.model)  # conv1: 64 filters of 3x3x3 as colour tiles, 8 x 8
    assert (grid.layer, grid.mode, grid.count, grid.shape) == ("features.0", "rgb", 64, (3, 3, 3))
    assert (grid.rows, grid.cols) == (8, 8)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    engine = Saliency(vgg.model, "guided-gradcam", runtime=CPU)
    maps = engine(x)
    assert engine.cam_layer == "avgpool"  # VGG's last spatial map (7x7 after adaptive pooling)
    assert maps.gradients.shape == x.shape and torch.isfinite(maps.gradients).all()
    assert maps.gradients.abs().sum() > 0 and maps.cam.shape == (2, 64, 64)
    result = dream(vgg, Target.unit("features.3", 7), DreamConfig(steps=4, size=64))
    assert result.image.shape == (64, 64, 3)
    assert result.final_score > result.start_score


def _relu_calls(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(plain ReLU/GELU applications, guided ones) in a traced graph, whatever form they take."""
    from retrieval.visualise.probe import GuidedGELU, GuidedReLU, GuidedReLU6, guided_gelu, guided_relu

    modules = dict(gm.named_modules())
    plain = guided = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            plain += type(modules[node.target]) in (nn.ReLU, nn.ReLU6, nn.GELU)
            guided += isinstance(modules[node.target], GuidedReLU | GuidedReLU6 | GuidedGELU)
        elif node.op == "call_function":
            plain += node.target in (F.relu, torch.relu, torch.relu_, F.relu_, F.gelu)
            guided += node.target in (guided_relu, guided_gelu)
        elif node.op == "call_method":
            plain += node.target in ("relu", "relu_")
    return plain, guided


def test_guided_gelu_keeps_positive_gradients_times_the_gelu_derivative() -> None:
    from retrieval.visualise.probe import GuidedGELU

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g, dtype=torch.float64) * 3
    up = torch.randn(200, generator=g, dtype=torch.float64)
    # Oracle: autograd's own GELU derivative, applied to the positive part of the incoming gradient.
    xa = x.clone().requires_grad_(True)
    (local,) = torch.autograd.grad(F.gelu(xa), xa, torch.ones_like(x))
    xg = x.clone().requires_grad_(True)
    out = GuidedGELU()(xg)
    torch.testing.assert_close(out, F.gelu(x))
    out.backward(up)
    torch.testing.assert_close(xg.grad, local * up.clamp(min=0))
    assert (xg.grad[up < 0] == 0).all() and (xg.grad[(up > 0) & (x > 1)] > 0).all()


def test_guided_relu6_passes_positive_gradients_where_relu6_is_not_flat() -> None:
    from retrieval.visualise.probe import GuidedReLU6

    x = torch.tensor([-1.0, 0.5, 3.0, 5.9, 6.5, 2.0], dtype=torch.float64, requires_grad=True)
    up = torch.tensor([1.0, 1.0, -2.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    out = GuidedReLU6()(x)
    torch.testing.assert_close(out, F.relu6(x.detach()))
    out.backward(up)
    # Oracle by hand: autograd's ReLU6 mask (0 < x < 6), then only the positive part from above.
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0, 0.5], dtype=torch.float64))


def test_efficientnet_lite_with_imagenet_weights_visualises(tmp_path: Path) -> None:
    lite = load_model("efficientnet_lite0", "imagenet")
    assert len(lite.classes) == 1000 and lite.classes[309] == "bee"
    grid = filters(lite.model)  # the stem: 32 filters of 3x3x3
    assert (grid.layer, grid.mode, grid.count, grid.shape) == ("_conv_stem", "rgb", 32, (3, 3, 3))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    for method in ("guided", "gradcam"):
        maps = Saliency(lite.model, method, runtime=CPU)(x)
        got = maps.gradients if method == "guided" else maps.cam
        assert torch.isfinite(got).all() and got.abs().sum() > 0, method
    result = dream(lite, Target.unit("_blocks.3", 5), DreamConfig(steps=4, size=96))
    assert result.final_score > result.start_score
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "act.png"
    args = ["viz", "activations", str(image), "-b", "efficientnet_lite0", "-l", "_blocks.0", "-o", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size[0] > 100  # 16 channels of the first block as tiles


def test_every_registry_convnet_traces_with_every_relu_guided() -> None:
    """Every registry architecture, built on the meta device (structure only, no weights computed):
    the probe traces it, resolves `conv1`, and no plain ReLU application (module, function or
    method, in place or not) is left in the guided copy, while the caller's model keeps its own."""
    from retrieval.backbones import get_spec, list_backbones

    names = [n for n in list_backbones() if get_spec(n).builder is not None]
    assert {"lenet", "alexnet", "vgg16_bn", "resnet50", "googlenet", "resnet8_small"} <= set(names)
    for name in names:
        spec = get_spec(name)
        with torch.device("meta"):
            model = spec.builder(spec.num_classes, 3).eval()
        relu_modules = sum(type(m) in (nn.ReLU, nn.ReLU6, nn.GELU) for m in model.modules())
        probe = Probe(model, ["conv1"], guided=True)
        plain, guided = _relu_calls(probe.body)
        assert plain == 0 and guided >= max(1, relu_modules), (name, plain, guided, relu_modules)
        assert sum(type(m) in (nn.ReLU, nn.ReLU6, nn.GELU) for m in model.modules()) == relu_modules, name


# --------------------------------------------------------------------------------------------
# Filters and activations


def test_filter_grid_shape_and_tiles(checkpoints: dict[int, Path]) -> None:
    model = load_model(weights=checkpoints[3]).model
    grid = filters(model, scale=4, pad=1)  # conv1: 6 filters of 3x5x5 -> 2 rows x 3 columns of 20 px
    assert (grid.layer, grid.mode, grid.count, grid.shape) == ("features.0", "rgb", 6, (3, 5, 5))
    assert grid.image.shape == (2 * 20 + 3, 3 * 20 + 4, 3)
    w = model.features[0].weight.detach().numpy()
    expected = normalise01(w[4]).transpose(1, 2, 0).repeat(4, 0).repeat(4, 1)  # row 1, column 1
    tile = grid.image[1 + 20 + 1 : 1 + 20 + 1 + 20, 1 + 20 + 1 : 1 + 20 + 1 + 20]
    np.testing.assert_allclose(tile / 255.0, expected, atol=1 / 255)

    grey = filters(load_model(weights=checkpoints[1]).model, scale=4)
    assert (grey.mode, grey.image.shape) == ("grey", (43, 64, 1))
    mean = filters(model, "conv2", scale=2)  # 16 filters of 6x5x5, mean over inputs -> 4x4 of 10 px
    assert (mean.layer, mean.mode, mean.image.shape) == ("features.3", "mean", (4 * 10 + 5, 4 * 10 + 5, 1))
    per_channel = filters(model, "features.3", mode="channels", scale=2)  # 16 rows x 6 input channels
    assert (per_channel.rows, per_channel.cols) == (16, 6)
    assert per_channel.image.shape == (16 * 10 + 17, 6 * 10 + 7, 1)
    with pytest.raises(UnknownNameError, match=r"conv1 \(= features\.0\), conv2 \(= features\.3\)"):
        filters(model, "classifier.0")


def test_activations_grid(checkpoints: dict[int, Path], shapes: Path) -> None:
    vm = load_model(weights=checkpoints[3])
    image = sorted((shapes / "star").iterdir())[0]
    grid = activations(vm, image, "conv1", device="cpu")
    assert grid.node == "features.0" and grid.maps.shape == (6, 28, 28)
    tf = Transform(vm.preprocess)
    x = tf.normalize(load_tensor(image, tf)[0])
    with torch.no_grad():
        torch.testing.assert_close(grid.maps, vm.model.features[0](x[None])[0])
    assert grid.image.shape == (2 * 28 * 2 + 3, 3 * 28 * 2 + 4, 1)  # 6 maps -> 2x3, enlarged twice
    fc = activations(vm, image, "classifier.1", device="cpu")  # a fully connected layer: 84 1x1 tiles
    assert fc.maps.shape == (84, 1, 1)


# --------------------------------------------------------------------------------------------
# Layer names


def test_layer_names_resolve_and_errors_list_valid_names() -> None:
    import torchvision

    lenet = LeNet5(8, 1)
    assert resolve_layer(lenet, "conv2") == "features.3"
    assert resolve_layer(lenet, "features.3") == "features.3"
    assert resolve_layer(lenet, "features") == "features.7"  # a container taps its last node
    with pytest.raises(UnknownNameError) as err:
        resolve_layer(lenet, "conv9")
    message = str(err.value)
    for name in ("conv1 (= features.0)", "conv3 (= features.6)", "features.4", "classifier.1", "flatten"):
        assert name in message
    resnet = torchvision.models.resnet18()
    assert resolve_layer(resnet, "layer4") == "layer4.1.relu_1"
    assert resolve_layer(resnet, "conv1") == "conv1"  # a real module name wins over the alias
    with pytest.raises(UnknownNameError, match=r"layer4\.1\.relu_1.*layer4"):
        resolve_layer(resnet, "layer5")
    with pytest.raises(UnknownNameError, match=r"features\.0"):
        Probe(lenet, ["nope"])


# --------------------------------------------------------------------------------------------
# Memory


_MEMORY_PROBE = """
import gc, json, os, sys, tracemalloc
import torch
from retrieval.device import resolve_runtime
from retrieval.visualise import Saliency, load_model

torch.set_num_threads(1)
engine = Saliency(load_model(weights=sys.argv[1]).model, "guided-gradcam", runtime=resolve_runtime("cpu", "float32"))
x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensors():
    # type(), not isinstance(): isinstance would touch deprecated torch proxies, which warn.
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def run(batches, keep):
    for _ in range(batches):
        maps = engine(x)
        if keep is not None:
            keep.append(maps)  # heat, gradients, Grad-CAM, classes, scores of 16 images: 320 KB a batch


def measure(batches, keep):
    run(10, None)  # warm-up: allocator pools and caches reach their steady size
    gc.collect()
    tracemalloc.start()
    before = rss(), tracemalloc.get_traced_memory()[0], tensors()
    run(batches, keep)
    gc.collect()
    after = rss(), tracemalloc.get_traced_memory()[0], tensors()
    tracemalloc.stop()
    return dict(zip(("rss", "py", "tensors"), (a - b for a, b in zip(after, before))))


flat = measure(200, None)
kept = []
leak = measure(60, kept)
print(json.dumps({"flat": flat, "leak": leak}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_saliency_memory_flat_over_200_batches(checkpoints: dict[int, Path]) -> None:
    # A fresh interpreter: in this one, memory that earlier tests freed is reused without RSS growth,
    # which would hide a leak as well as a flat line.
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(checkpoints[3])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    flat, leak = m["flat"], m["leak"]
    # 200 batches of 16 images (3200 images, guided Grad-CAM: two forward/backward passes each).
    assert flat["tensors"] == 0, f"{flat['tensors']} tensors outlived their batch"
    assert flat["rss"] < 8 * 2**20, f"RSS grew {flat['rss'] / 2**20:.1f} MiB over 200 batches"
    assert flat["py"] < 256 * 2**10, f"Python heap grew {flat['py'] / 2**10:.0f} KiB over 200 batches"
    # The measurement can see a leak: keeping each batch's results (5 tensors, 320 KB) shows up.
    assert leak["tensors"] == 60 * 5
    assert leak["rss"] > 12 * 2**20, f"a 19 MB leak showed only {leak['rss'] / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------
# Folders, reports, top patches


@pytest.mark.parametrize(("channels", "method"), [(1, "guided"), (3, "gradcam"), (3, "guided-gradcam")])
def test_saliency_folder_1_and_3_channels(
    checkpoints: dict[int, Path], few_images: Path, tmp_path: Path, channels: int, method: str
) -> None:
    vm = load_model(weights=checkpoints[channels])
    seen: list[tuple[int, int]] = []
    run = saliency_folder(
        vm,
        few_images,
        tmp_path / "sal",
        SaliencyConfig(method=method, batch_size=5, dtype="float32"),  # the argmax below is fp32
        progress=lambda d, t: seen.append((d, t)),
    )
    assert run.images == 13 and not run.skipped
    assert seen[-1] == (13, 13) and len(seen) == 3
    pngs = sorted(p.relative_to(tmp_path / "sal").as_posix() for p in (tmp_path / "sal").rglob("*.png"))
    assert pngs == sorted(e.relpath + ".png" for e in scan(few_images)[0])
    panel = np.asarray(Image.open(tmp_path / "sal" / pngs[0]))
    assert panel.shape == (128 + 4, 3 * 128 + 8, 3)  # 3 tiles of 32 px enlarged 4x, 2 px padding
    page = run.report.read_text()
    assert page.count("<tr>") == 1 + 13
    # The report names each image's predicted class: the model's own argmax.
    tf = Transform(vm.preprocess)
    entry = scan(few_images)[0][0]
    with torch.no_grad():
        predicted = vm.classes[int(vm.model(tf.normalize(load_tensor(entry.path, tf)[0])[None]).argmax())]
    assert re.search(rf"<td>{re.escape(entry.relpath)}</td><td>[^<]*</td><td>{predicted}</td>", page)


def test_report_escapes_hostile_names_and_is_self_contained(
    checkpoints: dict[int, Path], tmp_path: Path
) -> None:
    hostile = "<img src=x onerror=alert(1)>.png"
    label = "<svg onload=alert(2)>"
    folder = tmp_path / "in" / label
    folder.mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(folder / hostile)
    (folder / "bad\"'&<b>.png").write_bytes(b"not a png <b>")
    vm = load_model(weights=checkpoints[3])
    run = saliency_folder(vm, tmp_path / "in", tmp_path / "out", SaliencyConfig(method="vanilla"))
    page = run.report.read_text()
    assert run.images == 1 and len(run.skipped) == 1
    # Only the report's own tags, and every image is an embedded thumbnail with no other attribute.
    ours = {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "p",
        "br",
        "b",
        "table",
        "tr",
        "th",
        "td",
    }
    ours |= {"img", "a", "ul", "li", "code"}
    assert {t.lower() for t in re.findall(r"<\s*/?\s*([a-zA-Z][\w-]*)", page)} <= ours
    images = re.findall(r"<img[^>]*>", page)
    assert len(images) == 2
    for tag in images:
        assert re.fullmatch(r"<img src='data:image/png;base64,[A-Za-z0-9+/=]+' alt=''>", tag), tag[:80]
    for text in (hostile, label, "bad\"'&<b>.png"):
        assert html.escape(text) in page
    assert "%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.png" in page  # the link is URL-quoted too
    assert (tmp_path / "out" / label / (hostile + ".png")).is_file()


def test_top_patches_rank_and_receptive_fields(checkpoints: dict[int, Path], few_images: Path) -> None:
    vm = load_model(weights=checkpoints[3])
    result = top_patches(vm, few_images, "conv2", channel=5, n=4, batch_size=3, device="cpu")
    # Brute force: every image's strongest response of the channel, ranked.
    tf = Transform(vm.preprocess)
    scores = []
    for entry in scan(few_images)[0]:
        with torch.no_grad():
            a = vm.model.features[:4](tf.normalize(load_tensor(entry.path, tf)[0])[None])[0, 5]
        scores.append((float(a.max()), entry.relpath))
    scores.sort(key=lambda s: -s[0])
    assert [p.relpath for p in result.patches] == [rel for _, rel in scores[:4]]
    assert [p.score for p in result.patches] == pytest.approx([s for s, _ in scores[:4]], rel=1e-5)
    for p in result.patches:
        y, x = p.position  # conv 5 -> pool 2 -> conv 5: 14 px fields on a stride of 2
        assert p.box == (2 * y, 2 * x, 2 * y + 14, 2 * x + 14)
        assert p.image.shape == (14, 14, 3)
    assert result.images == 13


def test_receptive_fields_of_a_resnet_are_measured_exactly() -> None:
    import torchvision

    model = torchvision.models.resnet18().eval()
    # conv 7/2 -> maxpool 3/2 -> four 3x3 convs: 43 px on a stride of 4, centred at 4j; clipped at 0.
    boxes = receptive_boxes(model, "layer1", 0, (3, 224, 224), [(20, 20), (10, 30), (0, 0)])
    assert boxes == [(59, 59, 102, 102), (19, 99, 62, 142), (0, 0, 22, 22)]


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_commands(checkpoints: dict[int, Path], few_images: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt = str(checkpoints[3])
    r = runner.invoke(app, ["viz", "filters", "-w", ckpt, "--layer", "conv2", "-o", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output
    assert "features.3: 16 filters of 6x5x5 (mean), grid 4x4" in r.output
    assert (
        Image.open(tmp_path / "f.png").size
        == filters(load_model(weights=ckpt).model, "conv2").image.shape[1::-1]
    )

    r = runner.invoke(
        app,
        [
            "viz",
            "saliency",
            str(few_images),
            "-w",
            ckpt,
            "-m",
            "gradcam",
            "-t",
            "star",
            "-o",
            str(tmp_path / "s"),
        ],
    )
    assert r.exit_code == 0, r.output
    star = load_model(weights=ckpt).classes.index("star")
    assert f"13 images (gradcam, class {star} (star), Grad-CAM layer features.5)" in r.output
    assert (tmp_path / "s" / "report.html").is_file()

    r = runner.invoke(
        app, ["viz", "dream", "-w", ckpt, "--class", "circle", "--steps", "20", "-o", str(tmp_path / "d.png")]
    )
    assert r.exit_code == 0, r.output
    start, final = (float(v) for v in re.search(r"class \d+ \(circle\): (\S+) -> (\S+)", r.output).groups())
    assert final > start and Image.open(tmp_path / "d.png").size == (32, 32)

    image = str(next((few_images / "star").iterdir()))
    r = runner.invoke(
        app, ["viz", "activations", image, "-w", ckpt, "-l", "conv3", "-o", str(tmp_path / "a.png")]
    )
    assert r.exit_code == 0, r.output
    assert "conv3 (features.6): 120 maps of 1x1" in r.output

    out = str(tmp_path / "p.png")
    r = runner.invoke(
        app,
        ["viz", "top-patches", str(few_images), "-w", ckpt, "-l", "conv2", "-c", "5", "-n", "3", "-o", out],
    )
    assert r.exit_code == 0, r.output
    assert "top 3 of 13 images" in r.output and Path(out).is_file()

    r = runner.invoke(app, ["viz", "activations", image, "-w", ckpt, "-l", "layer4"])
    assert (
        r.exit_code == 2 and "Valid layers: conv1 (= features.0)" in r.output and "Traceback" not in r.output
    )
    r = runner.invoke(app, ["viz", "saliency", image, "-w", ckpt, "-m", "smoothgrad"])
    assert r.exit_code == 2 and "vanilla, guided, gradcam, guided-gradcam" in r.output
    r = runner.invoke(app, ["viz", "dream", "-w", ckpt, "--class", "hexagon"])
    assert r.exit_code == 2 and "Known classes: arrow, circle" in r.output
    r = runner.invoke(app, ["viz", "saliency", image, "-w", ckpt, "--layer", "conv2"])
    assert r.exit_code == 2 and "--layer and --channel" in r.output


def test_cli_bad_input_is_one_clear_line_and_exit_2(
    checkpoints: dict[int, Path], few_images: Path, tmp_path: Path
) -> None:
    ckpt = str(checkpoints[3])
    image = str(next((few_images / "star").iterdir()))
    folder = str(few_images)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = str(tmp_path / "missing")
    valid = "Valid layers: conv1 (= features.0), conv2 (= features.3), conv3 (= features.6)"
    cases = [
        (["saliency", missing], f"{missing} does not exist"),
        (["top-patches", missing, "-l", "conv2", "-c", "1"], f"{missing} does not exist"),
        (["activations", missing + ".png", "-l", "conv1"], "missing.png does not exist"),
        (["activations", folder, "-l", "conv1"], "is a folder; give one image file"),
        (["filters", "--layer", "conv9"], "Valid conv layers: conv1 (= features.0), conv2 (= features.3)"),
        (["saliency", image, "--layer", "conv9", "--channel", "1"], valid),
        (["saliency", image, "-m", "gradcam", "--cam-layer", "conv9"], valid),
        (["dream", "--layer", "conv9", "--channel", "1"], valid),
        (["activations", image, "--layer", "conv9"], valid),
        (["top-patches", folder, "-l", "conv9", "-c", "1"], valid),
        (
            ["saliency", image, "--layer", "conv2", "--channel", "16"],
            "Channel 16 of conv2 is out of range: valid are 0..15",
        ),
        (
            ["dream", "--layer", "conv2", "--channel", "-1"],
            "Channel -1 of conv2 is out of range: valid are 0..15",
        ),
        (
            ["top-patches", folder, "-l", "conv2", "-c", "16"],
            "Channel 16 of conv2 is out of range: valid are 0..15",
        ),
        (["top-patches", folder, "-l", "classifier.1", "-c", "1"], "top patches need a conv layer"),
        (["saliency", image, "-t", "8"], "Class 8 is out of range: valid are 0..7"),
        (["saliency", image, "-l", "conv2", "-c", "1", "--neuron", "10,0"], "outside conv2's 10x10 map"),
        (["saliency", str(broken)], "None of the 1 images under"),
        (["saliency", str(broken / "torn.png")], "torn.png could not be decoded"),
        (["activations", str(broken / "torn.png"), "-l", "conv1"], "torn.png: "),
        (["top-patches", str(broken), "-l", "conv2", "-c", "1"], "torn.png: "),
        (["saliency", image, "-o", image], "Cannot write the report"),
        (["filters", "-o", folder], "Cannot write"),
        (["filters", "--scale", "0"], "scale must be at least 1"),
        (["filters", "--max-filters", "0"], "max filters must be at least 1"),
        (["dream", "--class", "0", "--jitter", "-1"], "jitter must be at least 0"),
        (["dream", "--class", "0", "--blur-sigma", "0"], "blur sigma must be positive"),
        (["dream", "--class", "0", "--lr", "0"], "lr must be positive"),
        (["dream", "--class", "0", "--size", "64"], "does not accept a 64x64 input"),
        (["saliency", image, "--batch-size", "0"], "batch size must be at least 1"),
    ]
    runner = CliRunner()
    for args, expected in cases:
        if "-o" not in args:
            args = [*args, "-o", str(tmp_path / "out" / args[0])]
        r = runner.invoke(app, ["viz", *args, "-w", ckpt])
        assert r.exit_code == 2, (args, r.exit_code, r.exception, r.output)
        assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output, (args, r.output)
        assert "error:" in r.output and expected in r.output, (args, r.output)
    assert not (tmp_path / "out" / "saliency").exists() or not any(
        (tmp_path / "out" / "saliency").rglob("*.html")
    )

    # A file that fails to decode among good ones is skipped, with its reason on stderr.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src in sorted((few_images / "star").iterdir())[:2]:
        (mixed / src.name).write_bytes(src.read_bytes())
    (mixed / "torn.png").write_bytes((broken / "torn.png").read_bytes())
    for args in (["saliency", str(mixed)], ["top-patches", str(mixed), "-l", "conv2", "-c", "1", "-n", "2"]):
        r = runner.invoke(app, ["viz", *args, "-w", ckpt, "-o", str(tmp_path / "ok" / args[0])])
        assert r.exit_code == 0, r.output
        assert re.search(r"skipped 1 unreadable files.*\n  torn\.png: \S", r.output), r.output


def test_cli_subprocess(checkpoints: dict[int, Path], tmp_path: Path) -> None:
    out = tmp_path / "filters.png"
    cmd = [sys.executable, "-c", "from retrieval.cli import main; main()", "viz", "filters"]
    proc = subprocess.run(
        [*cmd, "-w", str(checkpoints[1]), "-o", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "features.0: 6 filters of 1x5x5 (grey)" in proc.stdout and out.is_file()
    # And a bad input through the real entry point: one line on stderr, exit 2, no traceback.
    bad = [*cmd[:-1], "activations", str(out), "-w", str(checkpoints[1]), "-l", "conv9", "-o", str(out)]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: Unknown layer 'conv9'") and proc.stdout == ""
