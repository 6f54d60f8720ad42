"""Saliency: vanilla gradients, guided backprop, Grad-CAM and guided Grad-CAM, batched over folders."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.device import Runtime, resolve_runtime
from retrieval.errors import RetrieveError, UnknownNameError
from retrieval.images import Decoder, ImageFileEntry, PILDecoder, Transform
from retrieval.visualise import render
from retrieval.visualise.probe import Probe, Target, frozen_copy, target_scores
from retrieval.visualise.source import Batch, VizModel, decode_batches, list_images, nothing_decoded

METHODS = ("vanilla", "guided", "gradcam", "guided-gradcam")


@dataclass
class SaliencyMaps:
    """Saliency of one batch; every tensor is detached, float32, on the CPU."""

    heat: torch.Tensor  # [B, H, W] in [0, 1]: what the overlay shows
    gradients: torch.Tensor | None  # [B, C, H, W] input gradients (all methods but gradcam)
    cam: torch.Tensor | None  # [B, H, W] Grad-CAM in [0, 1] (gradcam, guided-gradcam)
    chosen: torch.Tensor  # [B] the class (or channel) whose score was differentiated
    scores: torch.Tensor  # [B] that score (a pre-softmax logit, or the unit's activation)


def default_cam_layer(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The last module whose output is still a spatial map (more than 1x1): `layer4`, `features`...

    Container modules report after their children, so a whole block (`layer4`) wins over its last ReLU.
    """
    shell = frozen_copy(model)
    order: list[str] = []

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if (
                isinstance(output, torch.Tensor)
                and output.ndim == 4
                and output.shape[2] * output.shape[3] > 1
            ):
                order.append(name)

        return hook

    # Hooks live on a private copy and only for this one probe forward.
    handles = [m.register_forward_hook(record(n)) for n, m in shell.named_modules() if n]
    try:
        with torch.inference_mode():
            shell(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise RetrieveError("No layer of this model has a spatial map for Grad-CAM; pass «cam_layer».")
    return order[-1]


class Saliency:
    """Saliency maps for batches of normalised images; the model is copied and traced once.

    Each call frees its graph before returning (autograd.grad, nothing retained, no hooks), so
    memory stays flat however many batches go through. Weights are frozen in the copy: only the
    input gradient is computed, not the weight gradients a training backward would also produce.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "guided",
        target: Target = Target(),
        cam_layer: str | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        if method not in METHODS:
            raise UnknownNameError(
                f"Unknown saliency method {method!r}. Valid methods: {', '.join(METHODS)}."
            )
        self.method, self.target = method, target
        self.runtime = runtime or resolve_runtime("auto", "float32")
        self._base = frozen_copy(model)
        self.cam_layer = cam_layer
        self._plain: Probe | None = None
        self._guided: Probe | None = None
        if method in ("vanilla", "guided", "guided-gradcam"):
            guided = method != "vanilla"
            probe = Probe(self._base, target.layers, guided=guided, share_weights=True)
            if guided:
                self._guided = self._place(probe)
            else:
                self._plain = self._place(probe)
        if cam_layer is not None:
            self._build_cam_probe(cam_layer)

    def _place(self, probe: Probe) -> Probe:
        probe = probe.to(self.runtime.device)
        return probe.to(memory_format=torch.channels_last) if self.runtime.channels_last else probe

    def _build_cam_probe(self, cam_layer: str) -> None:
        layers = dict.fromkeys([*self.target.layers, cam_layer])
        self._plain = self._place(Probe(self._base, layers, guided=False, share_weights=True))
        self.cam_layer = cam_layer

    def __call__(self, x: torch.Tensor) -> SaliencyMaps:
        if x.ndim != 4:
            raise RetrieveError(f"Saliency needs a batch [B, C, H, W], got shape {list(x.shape)}.")
        rt = self.runtime
        x = x.to(rt.device, torch.float32)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grads = cam = chosen = scores = None
        if self.method in ("gradcam", "guided-gradcam"):
            if self.cam_layer is None or self._plain is None:
                self._build_cam_probe(self.cam_layer or default_cam_layer(self._base, tuple(x.shape[1:])))
            cam, chosen, scores = self._gradcam(x)
        if self.method != "gradcam":
            probe = self._plain if self.method == "vanilla" else self._guided
            # guided Grad-CAM: the guided pass follows the classes the Grad-CAM pass chose.
            grads, chosen, scores = self._input_gradient(probe, x, chosen)
            if cam is not None:
                grads = grads * cam[:, None]
            heat = _robust_unit(grads.abs().amax(1))
        else:
            heat = cam
        return SaliencyMaps(
            heat=heat.cpu(),
            gradients=None if grads is None else grads.cpu(),
            cam=None if cam is None else cam.cpu(),
            chosen=chosen.cpu(),
            scores=scores.cpu(),
        )

    def _input_gradient(
        self, probe: Probe, x: torch.Tensor, chosen: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad(), self.runtime.autocast():
            xi = x.detach().requires_grad_(True)
            out = probe(xi)
            scores, chosen = target_scores(out, self.target, chosen=chosen)
            (grad,) = torch.autograd.grad(scores.sum(), xi)
        # Batch images are independent in eval mode, so the gradient of the sum is each image's own.
        return grad.detach().float(), chosen.detach(), scores.detach().float()

    def _gradcam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._plain is not None and self.cam_layer is not None
        with torch.enable_grad(), self.runtime.autocast():
            # The input needs grad only so the graph exists; autograd stops at the Grad-CAM layer.
            xi = x.detach().requires_grad_(True)
            out = self._plain(xi)
            act = out[self.cam_layer]
            if act.ndim != 4:
                raise RetrieveError(
                    f"Grad-CAM layer {self.cam_layer} has no spatial map (shape {list(act.shape[1:])}); "
                    "choose a convolutional layer with «cam_layer»."
                )
            scores, chosen = target_scores(out, self.target)
            (grad,) = torch.autograd.grad(scores.sum(), act, allow_unused=True)
        if grad is None:
            raise RetrieveError(
                f"The target ({self.target.describe()}) does not depend on Grad-CAM layer "
                f"{self.cam_layer}: choose a «cam_layer» that comes before {self.target.layer}."
            )
        act, grad = act.detach().float(), grad.float()
        weights = grad.mean(dim=(2, 3), keepdim=True)  # alpha_k: global-average-pooled gradients
        cam = F.relu((weights * act).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
        return (cam / peak).contiguous(), chosen.detach(), scores.detach().float()


def _robust_unit(m: torch.Tensor) -> torch.Tensor:
    """[B, H, W] >= 0 -> [0, 1] per image, clipping at the 99th percentile so one pixel cannot wash it out."""
    flat = m.flatten(1).float()
    top = torch.quantile(flat, 0.99, dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (m / top).clamp(0, 1)


def saliency(
    vm: VizModel,
    images: torch.Tensor,
    method: str = "guided",
    target: Target = Target(),
    cam_layer: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> SaliencyMaps:
    """Saliency of a batch of normalised images [B, C, H, W] (or one image [C, H, W])."""
    batch = images[None] if images.ndim == 3 else images
    engine = Saliency(vm.model, method, target, cam_layer, resolve_runtime(device, dtype))
    return engine(batch)


# --------------------------------------------------------------------------------------------
# Folders


@dataclass(frozen=True)
class SaliencyConfig:
    """Settings of `retrieve viz saliency` / `saliency_folder`."""

    method: str = "guided"  # vanilla, guided, gradcam or guided-gradcam
    target: Target = field(default_factory=Target)  # predicted class, a class, or a layer's unit
    cam_layer: str | None = None  # Grad-CAM layer; None = the last layer with a spatial map
    batch_size: int = 16  # images per forward/backward
    device: str = "auto"
    # auto = the project's device policy: bf16 autocast on GPUs and on CPUs with native bf16 (maps
    # agree with float32 to cosine 0.99; 1.85x -> 3.4x the one-image loop on 2 EPYC cores,
    # bench/RESULTS.md), float32 elsewhere. Oracle tests pin float32.
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnknownNameError(
                f"Unknown saliency method {self.method!r}. Valid methods: {', '.join(METHODS)}."
            )
        if self.batch_size < 1:
            raise RetrieveError("batch size must be at least 1")


@dataclass(frozen=True)
class SaliencyRun:
    """What `saliency_folder` wrote."""

    out: Path  # folder of PNG panels (input | overlay | gradient or heat map)
    report: Path  # one self-contained HTML file
    images: int  # images processed
    skipped: list[tuple[str, str]]  # (relpath, reason)
    seconds: float
    runtime: str  # device and dtype, in words
    cam_layer: str | None  # the Grad-CAM layer used, when there was one


def saliency_folder(
    vm: VizModel,
    path: str | os.PathLike,
    out: str | os.PathLike,
    config: SaliencyConfig = SaliencyConfig(),
    progress: Callable[[int, int], None] | None = None,
    *,
    decoder: Decoder = PILDecoder(),
) -> SaliencyRun:
    """Saliency for one image or every image below a folder: `out/<relpath>.png` panels and `out/report.html`.

    Images go through in batches; each batch's results are written and dropped before the next
    one, and the report is streamed to disk, so memory does not grow with the number of images.
    `progress(done, total)` is called after each batch; `decoder` decodes each file (default: PIL).
    """
    entries, problems = list_images(path)
    out = Path(out)
    runtime = resolve_runtime(config.device, config.dtype)
    engine = Saliency(vm.model, config.method, config.target, config.cam_layer, runtime)
    transform = Transform(vm.preprocess)
    meta = [
        ("model", vm.name),
        ("method", config.method),
        ("target", config.target.describe(vm.classes)),
        ("images", str(Path(path))),
    ]
    columns = ["file", "label", "target", "score", "input", "saliency"]
    start = time.perf_counter()
    done = 0
    skipped: list[tuple[str, str]] = list(problems)
    with render.HtmlReport(out / "report.html", f"Saliency: {config.method}", meta, columns) as report:

        def consume(batch: Batch) -> None:
            nonlocal done
            skipped.extend(batch.skipped)
            if batch.entries:
                maps = engine(batch.inputs)
                for i, entry in enumerate(batch.entries):
                    _write_one(vm, config, report, out, entry, batch.pixels[i], maps, i)
                done += len(batch.entries)
            if progress is not None:
                progress(done + len(skipped), len(entries))

        decode_batches(entries, transform, config.batch_size, consume, decoder=decoder)
        if done == 0:  # raised inside: the half-written report is removed, not renamed into place
            raise nothing_decoded(path, len(entries), skipped)
        for rel, reason in skipped:
            report.add_skipped(rel, reason)
    return SaliencyRun(
        out=out,
        report=out / "report.html",
        images=done,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        runtime=runtime.describe(),
        cam_layer=engine.cam_layer,
    )


def panel(image: np.ndarray, maps: SaliencyMaps, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(input | heat overlay | gradient image or bare heat map, the overlay alone), in [0, 1].

    The panel is enlarged for tiny inputs (28-32 px LeNets) so it stays legible.
    """
    heat = maps.heat[i].numpy()
    third = (
        render.as_rgb(render.heatmap(heat))
        if maps.gradients is None
        else render.as_rgb(render.gradient_image(maps.gradients[i]))
    )
    over = render.overlay(image, heat)
    tiles = np.stack([render.as_rgb(image), over, third])
    picture = render.tile_grid(
        tiles, cols=3, scale=render.display_scale(image.shape[0]), pad=2, background=1.0
    )
    return picture, over


def _write_one(
    vm: VizModel,
    config: SaliencyConfig,
    report: render.HtmlReport,
    out: Path,
    entry: ImageFileEntry,
    pixels: torch.Tensor,
    maps: SaliencyMaps,
    i: int,
) -> None:
    image = pixels.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    picture, over = panel(image, maps, i)
    name = entry.relpath + ".png"
    render.save_png(picture, out / name)
    chosen = int(maps.chosen[i])
    what = vm.class_name(chosen) if config.target.kind != "unit" else f"{config.target.layer}:{chosen}"
    cells = [entry.relpath, entry.label, what, f"{float(maps.scores[i]):.3f}"]
    report.add_row([*cells, render.to_uint8(render.as_rgb(image)), render.to_uint8(over)], link=name)
