"""Filters as tiles, a layer's feature maps for one image, and the dataset patches that excite a channel most."""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retrieval.device import resolve_runtime
from retrieval.errors import RetrieveError
from retrieval.images import Decoder, PILDecoder, Transform
from retrieval.visualise import render
from retrieval.visualise.probe import Probe, conv_module, frozen_copy
from retrieval.visualise.source import (
    Batch,
    VizModel,
    decode_batches,
    list_images,
    load_image,
    nothing_decoded,
)

FILTER_MODES = ("auto", "rgb", "grey", "mean", "channels")


@dataclass(frozen=True)
class FilterGrid:
    """A conv layer's filters drawn as tiles."""

    image: np.ndarray  # uint8 [H, W, C], C = 3 for "rgb", else 1
    layer: str  # module name, e.g. "features.3"
    count: int  # filters shown
    total: int  # filters in the layer
    shape: tuple[int, int, int]  # (input channels, height, width) of one filter
    mode: str  # rgb, grey, mean (over input channels) or channels (one tile per input channel)
    rows: int
    cols: int


def filters(
    model: nn.Module,
    layer: str | None = None,
    mode: str = "auto",
    scale: int | None = None,
    pad: int = 1,
    max_filters: int = 256,
) -> FilterGrid:
    """Tiles of a conv layer's weights, each min-max normalised on its own (cs231n style).

    mode "auto": a first layer on RGB or grey input shows colour or grey tiles; deeper layers
    show each filter's mean over its input channels. "channels" shows one row per filter and one
    tile per input channel. The first `max_filters` filters are shown. `model` may also be the
    VizModel that `load_model` returns, as the other visualisations take.
    """
    model = getattr(model, "model", model)
    if mode not in FILTER_MODES:
        raise RetrieveError(f"Unknown filter mode {mode!r}; choose one of {', '.join(FILTER_MODES)}.")
    if max_filters < 1:
        raise RetrieveError(f"max filters must be at least 1, not {max_filters}")
    if scale is not None and scale < 1:
        raise RetrieveError(f"scale must be at least 1 pixel per weight, not {scale}")
    if pad < 0:
        raise RetrieveError(f"pad must be at least 0, not {pad}")
    name, conv = conv_module(model, layer)
    w = conv.weight.detach().float().cpu()  # [out, in/groups, kh, kw]
    total, cin, kh, kw = w.shape
    if mode == "auto":
        mode = {3: "rgb", 1: "grey"}.get(cin, "mean")
    if mode == "rgb" and cin != 3:
        raise RetrieveError(f"{name} filters have {cin} input channels, not 3; use «mode» mean or channels.")
    if mode == "grey" and cin != 1:
        raise RetrieveError(f"{name} filters have {cin} input channels, not 1; use «mode» mean or channels.")
    w = w[:max_filters].numpy()
    count = w.shape[0]
    cols = None
    if mode == "rgb":
        tiles = render.normalise01(w, axes=(1, 2, 3)).transpose(0, 2, 3, 1)
    elif mode in ("grey", "mean"):
        tiles = render.normalise01(w.mean(axis=1, keepdims=True), axes=(1, 2, 3)).transpose(0, 2, 3, 1)
    else:
        # Normalised per filter across its input channels, so channels of one filter compare fairly.
        tiles = render.normalise01(w, axes=(1, 2, 3)).reshape(count * cin, kh, kw, 1)
        cols = cin
    scale = scale or render.display_scale(max(kh, kw), 40)
    image = render.tile_grid(tiles, cols=cols, scale=scale, pad=pad)
    cols = cols or max(1, min(int(np.ceil(np.sqrt(len(tiles)))), len(tiles)))
    rows = int(np.ceil(len(tiles) / cols))
    return FilterGrid(image, name, count, total, (cin, kh, kw), mode, rows, cols)


@dataclass(frozen=True)
class ActivationGrid:
    """One image's feature maps at a layer."""

    maps: torch.Tensor  # [K, h, w] (a fully connected layer is [K, 1, 1])
    image: np.ndarray  # uint8 grid, one tile per channel, each min-max normalised
    layer: str
    node: str  # the FX node tapped


def activations(vm: VizModel, image: str | os.PathLike, layer: str, device: str = "auto") -> ActivationGrid:
    """Feature maps of `layer` for one image, as a grid of per-channel normalised tiles."""
    runtime = resolve_runtime(device, "float32")
    probe = Probe(vm.model, [layer]).to(runtime.device)
    _, x = load_image(image, vm.preprocess)
    with torch.inference_mode():
        act = probe(x[None].to(runtime.device))[layer][0].float().cpu()
    maps = act.reshape(act.shape[0], *(act.shape[1:] if act.ndim == 3 else (1, 1)))
    if maps.ndim != 3:
        raise RetrieveError(f"{layer} gives an output of shape {list(act.shape)}; expected channels first.")
    tiles = render.normalise01(maps.numpy(), axes=(1, 2))[..., None]
    grid = render.tile_grid(tiles, scale=render.display_scale(maps.shape[1], 32), pad=1)
    return ActivationGrid(maps, grid, layer, probe.nodes[layer])


@dataclass(frozen=True)
class Patch:
    """A receptive-field patch of a dataset image where the channel fires strongly."""

    relpath: str
    label: str
    score: float  # the channel's activation at `position`
    position: tuple[int, int]  # (y, x) in the layer's map
    box: tuple[int, int, int, int]  # (top, left, bottom, right) in the network's input, exclusive ends
    image: np.ndarray  # uint8 [h, w, C] crop of the preprocessed input


@dataclass(frozen=True)
class TopPatches:
    """The strongest patches for one channel, best first, and a grid picture of them."""

    patches: list[Patch]
    image: np.ndarray  # uint8 grid of the patches
    layer: str
    node: str
    channel: int
    images: int  # images scanned
    skipped: list[tuple[str, str]] = field(default_factory=list)


def top_patches(
    vm: VizModel,
    path: str | os.PathLike,
    layer: str,
    channel: int,
    n: int = 10,
    batch_size: int = 32,
    device: str = "auto",
    *,
    decoder: Decoder = PILDecoder(),
) -> TopPatches:
    """The `n` images whose strongest response in `channel` of `layer` is highest, cropped to that unit's
    receptive field. A heap of `n` keeps memory constant over any number of images; `decoder`
    decodes each file (default: PIL).
    """
    if n < 1:
        raise RetrieveError("«n» must be at least 1")
    entries, problems = list_images(path)
    runtime = resolve_runtime(device, "float32")
    probe = Probe(vm.model, [layer]).to(runtime.device)
    transform = Transform(vm.preprocess)
    heap: list[tuple[float, int, str, str, Path, int, int]] = []
    skipped = list(problems)
    seen = 0

    def consume(batch: Batch) -> None:
        nonlocal seen
        skipped.extend(batch.skipped)
        if not batch.entries:
            return
        with torch.inference_mode():
            act = probe(batch.inputs.to(runtime.device))[layer].float()
        if act.ndim != 4:
            raise RetrieveError(
                f"{layer} has no spatial map (shape {list(act.shape[1:])}); top patches need a conv layer."
            )
        if not 0 <= channel < act.shape[1]:
            raise RetrieveError(
                f"Channel {channel} of {layer} is out of range: valid are 0..{act.shape[1] - 1}."
            )
        width = act.shape[3]
        values, where = act[:, channel].flatten(1).max(1)
        for entry, value, idx in zip(batch.entries, values.tolist(), where.tolist(), strict=True):
            item = (value, seen, entry.relpath, entry.label, entry.path, idx // width, idx % width)
            seen += 1
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)

    decode_batches(entries, transform, batch_size, consume, decoder=decoder)
    if not heap:
        raise nothing_decoded(path, len(entries), skipped)
    best = sorted(heap, key=lambda t: (-t[0], t[1]))
    pre = vm.preprocess
    boxes = receptive_boxes(
        vm.model, layer, channel, (pre.channels, pre.size, pre.size), [(b[5], b[6]) for b in best]
    )
    patches = []
    for (value, _, rel, label, file, y, x), (top, left, bottom, right) in zip(best, boxes, strict=True):
        pixels, _ = load_image(file, pre)
        crop = pixels[:, top:bottom, left:right].permute(1, 2, 0).numpy()
        patches.append(Patch(rel, label, value, (y, x), (top, left, bottom, right), crop))
    return TopPatches(patches, _patch_grid(patches), layer, probe.nodes[layer], channel, seen, skipped)


def receptive_boxes(
    model: nn.Module,
    layer: str,
    channel: int,
    input_shape: tuple[int, int, int],
    positions: list[tuple[int, int]],
) -> list[tuple[int, int, int, int]]:
    """Input boxes (top, left, bottom, right) that units at `positions` of `layer` can see.

    Measured, not derived from strides: on a copy whose convs have equal positive weights, whose
    max-pools average and whose batch norms are identities, every input pixel inside a unit's
    receptive field gets a positive gradient and every pixel outside gets exactly zero. This holds
    for branches and residual sums alike. A positive input keeps every ReLU open.
    """
    surrogate = frozen_copy(model).double()
    with torch.no_grad():
        for name, module in list(surrogate.named_modules()):
            if isinstance(module, nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()
            replacement: nn.Module | None = None
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                replacement = nn.Identity()
            elif isinstance(module, nn.MaxPool2d):
                replacement = nn.AvgPool2d(
                    module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode
                )
            if replacement is not None:
                parent, _, child = name.rpartition(".")
                setattr(surrogate.get_submodule(parent) if parent else surrogate, child, replacement)
    probe = Probe(surrogate, [layer], share_weights=True)
    x = torch.ones(len(positions), *input_shape, dtype=torch.float64, requires_grad=True)
    act = probe(x)[layer]
    ys = torch.tensor([p[0] for p in positions])
    xs = torch.tensor([p[1] for p in positions])
    picked = act[torch.arange(len(positions)), channel, ys, xs]
    (grad,) = torch.autograd.grad(picked.sum(), x)
    support = grad.abs().sum(1) > 0  # [n, H, W]
    boxes = []
    for mask in support:
        rows = torch.nonzero(mask.any(1)).flatten()
        cols = torch.nonzero(mask.any(0)).flatten()
        boxes.append((int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1))
    return boxes


def _patch_grid(patches: list[Patch]) -> np.ndarray:
    """Patches centred in equal tiles (border patches are clipped, so sizes differ), best first."""
    h = max(p.image.shape[0] for p in patches)
    w = max(p.image.shape[1] for p in patches)
    c = patches[0].image.shape[2]
    tiles = np.zeros((len(patches), h, w, c), np.float32)
    for i, p in enumerate(patches):
        ph, pw = p.image.shape[:2]
        top, left = (h - ph) // 2, (w - pw) // 2
        tiles[i, top : top + ph, left : left + pw] = p.image.astype(np.float32) / 255.0
    return render.tile_grid(
        tiles, cols=min(len(patches), 5), scale=render.display_scale(max(h, w), 64), pad=2
    )
