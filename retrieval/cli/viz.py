"""CLI: `retrieve viz filters | saliency | dream | activations | top-patches`, thin over retrieval.visualise."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from retrieval.cli._app import console, err_console, exits_cleanly, sub_app
from retrieval.errors import RetrieveError, UnknownNameError

if TYPE_CHECKING:
    from retrieval.visualise import Target

viz = sub_app(
    "viz",
    help=(
        "See what a convnet learned: filters, saliency (guided backprop, Grad-CAM), gradient-ascent "
        "dreams, feature maps and the dataset patches a channel likes best."
    ),
)

BackboneOpt = Annotated[
    str | None,
    typer.Option(
        "--backbone", "-b", help="Registry name (see `retrieve backbones`); implied by a checkpoint."
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights", "-w", help="imagenet, none (random init) or a checkpoint from `retrieve train`."
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer", "-l", help="Layer: a module (layer4, features.0), an FX node, or convN = Nth conv."
    ),
]
ChannelOpt = Annotated[int | None, typer.Option("--channel", "-c", help="Channel (feature map) of --layer.")]
NeuronOpt = Annotated[
    str | None,
    typer.Option("--neuron", help="Y,X position in --layer's map (default: strongest / whole map)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]


def _neuron(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise RetrieveError(f"--neuron takes Y,X (two integers), not {text!r}.") from None
    return y, x


def _class_index(text: str, classes: Sequence[str]) -> int:
    """An integer, or a class name of the model (checkpoint classes, ImageNet categories)."""
    if text.lstrip("-").isdigit():
        return int(text)
    if text in classes:
        return list(classes).index(text)
    known = ", ".join(classes) if classes else "none (this model's classes have no names; give an index)"
    raise UnknownNameError(f"Unknown class {text!r}. Known classes: {known}.")


def _target(
    classes: Sequence[str], cls: str | None, layer: str | None, channel: int | None, neuron: str | None
) -> Target:
    from retrieval.visualise import Target

    if layer is not None or channel is not None:
        if cls is not None:
            raise RetrieveError("Give either a class or --layer/--channel, not both.")
        if layer is None or channel is None:
            raise RetrieveError("A unit target needs both --layer and --channel.")
        return Target.unit(layer, channel, _neuron(neuron))
    if neuron is not None:
        raise RetrieveError("--neuron needs --layer and --channel.")
    if cls is None or cls == "predicted":
        return Target.predicted()
    return Target.of_class(_class_index(cls, classes))


def _report_skipped(skipped: Sequence[tuple[str, str]], where: str = "", limit: int = 10) -> None:
    """Each file that failed to decode, with the reason, on stderr (the first `limit` of them)."""
    if not skipped:
        return
    lines = [f"skipped {len(skipped)} unreadable files{where}:"]
    lines += [f"  {rel}: {reason}" for rel, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    # soft_wrap: one line per file whatever the terminal width, so the output can be grepped.
    err_console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)


@contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console
    )
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)


@viz.command("filters")
@exits_cleanly
def filters_cli(
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    layer: Annotated[
        str | None,
        typer.Option("--layer", "-l", help="Conv layer: module name or convN. Default: the first."),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode", help="auto, rgb, grey, mean (over input channels) or channels (one tile each)."
        ),
    ] = "auto",
    scale: Annotated[
        int | None, typer.Option("--scale", help="Pixels per weight. Default: about 40 px tiles.")
    ] = None,
    max_filters: Annotated[int, typer.Option("--max-filters", help="Show at most this many filters.")] = 256,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("filters.png"),
) -> None:
    """Draw a conv layer's filters as tiles (first layer in colour or grey).

    Examples:

      retrieve viz filters --backbone alexnet --weights imagenet --out filters.png
      retrieve viz filters --weights runs/r8/best.pt --layer conv2
    """
    from retrieval.visualise import filters, load_model
    from retrieval.visualise.render import save_png

    vm = load_model(backbone, weights)
    grid = filters(vm.model, layer, mode=mode, scale=scale, max_filters=max_filters)
    save_png(grid.image, out)
    cin, kh, kw = grid.shape
    shown = f"{grid.count} of {grid.total}" if grid.count < grid.total else str(grid.total)
    console.print(
        f"{grid.layer}: {shown} filters of {cin}x{kh}x{kw} ({grid.mode}), grid {grid.rows}x{grid.cols} -> {out}",
        highlight=False,
        markup=False,
    )


@viz.command("saliency")
@exits_cleanly
def saliency_cli(
    images: Annotated[Path, typer.Argument(help="An image or a folder of images (scanned recursively).")],
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    method: Annotated[
        str, typer.Option("--method", "-m", help="vanilla, guided, gradcam or guided-gradcam.")
    ] = "guided",
    target: Annotated[
        str | None,
        typer.Option("--target", "-t", help="predicted, a class index or a class name. Default: predicted."),
    ] = None,
    layer: LayerOpt = None,
    channel: ChannelOpt = None,
    neuron: NeuronOpt = None,
    cam_layer: Annotated[
        str | None,
        typer.Option("--cam-layer", help="Grad-CAM layer. Default: the last spatial one (layer4...)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward/backward.")] = 16,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for PNG panels and report.html.")] = Path(
        "saliency"
    ),
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="auto (bf16 autocast on GPUs and CPUs with native bf16, else float32), float32, "
            "bfloat16 or float16.",
        ),
    ] = "auto",
) -> None:
    """Where in each image the class (or a unit of a layer) looks: PNG overlays and one HTML report.

    Examples:

      retrieve viz saliency ./photos --weights runs/r8/best.pt --method guided --out sal/
      retrieve viz saliency cat.jpg --backbone resnet18 --weights imagenet --method gradcam
    """
    from retrieval.visualise import SaliencyConfig, load_model, saliency_folder

    vm = load_model(backbone, weights)
    config = SaliencyConfig(
        method=method,
        target=_target(vm.classes, target, layer, channel, neuron),
        cam_layer=cam_layer,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    with _progress("saliency") as progress:
        run = saliency_folder(vm, images, out, config, progress=progress)
    rate = run.images / max(run.seconds, 1e-9)
    cam = f", Grad-CAM layer {run.cam_layer}" if run.cam_layer else ""
    console.print(
        f"{run.images} images ({method}, {config.target.describe(vm.classes)}{cam}) in {run.seconds:.1f} s, "
        f"{rate:.1f} img/s on {run.runtime} -> {run.out}/ (report: {run.report})",
        highlight=False,
        markup=False,
    )
    _report_skipped(run.skipped, " (all listed in the report)")


@viz.command("dream")
@exits_cleanly
def dream_cli(
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    cls: Annotated[
        str | None, typer.Option("--class", help="Class index or name whose score is raised.")
    ] = None,
    layer: LayerOpt = None,
    channel: ChannelOpt = None,
    neuron: NeuronOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Gradient-ascent steps.")] = 200,
    lr: Annotated[float, typer.Option("--lr", help="Adam step size.")] = 0.05,
    l2: Annotated[float, typer.Option("--l2", help="L2 decay lambda (on the mean square).")] = 1e-3,
    jitter: Annotated[
        int | None, typer.Option("--jitter", help="Random shift in px per step. Default size/16.")
    ] = None,
    blur_every: Annotated[int, typer.Option("--blur-every", help="Blur every N steps (0 = never).")] = 4,
    blur_sigma: Annotated[float, typer.Option("--blur-sigma", help="Blur radius in pixels.")] = 0.5,
    clip: Annotated[
        float, typer.Option("--clip", help="Zero pixels below this norm percentile at each blur.")
    ] = 5.0,
    param: Annotated[
        str, typer.Option("--param", help="pixel, or fft (decorrelated Fourier basis).")
    ] = "pixel",
    init: Annotated[str, typer.Option("--init", help="zeros (the mean image) or noise.")] = "noise",
    size: Annotated[
        int | None, typer.Option("--size", help="Image side. Default: the model's input size.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("dream.png"),
    device: DeviceOpt = "auto",
) -> None:
    """Generate the image that maximises a class score (pre-softmax) or a channel of any layer.

    Examples:

      retrieve viz dream --weights runs/r8/best.pt --class 3 --out dream.png
      retrieve viz dream --weights runs/r8/best.pt --layer layer3 --channel 5 --param fft
    """
    from retrieval.visualise import DreamConfig, dream, load_model
    from retrieval.visualise.render import save_png

    vm = load_model(backbone, weights)
    if cls is None and layer is None and channel is None:
        raise RetrieveError("Say what to maximise: --class N (or a class name), or --layer L --channel C.")
    target = _target(vm.classes, cls, layer, channel, neuron)
    config = DreamConfig(
        steps=steps,
        lr=lr,
        l2=l2,
        jitter=jitter,
        blur_every=blur_every,
        blur_sigma=blur_sigma,
        clip_percentile=clip,
        param=param,
        init=init,
        size=size,
        seed=seed,
        device=device,
    )
    with _progress("dream") as progress:
        result = dream(vm, target, config, progress=progress)
    save_png(result.image, out)
    console.print(
        f"{result.objective}: {result.start_score:.3f} -> {result.final_score:.3f} after {steps} steps -> {out}",
        highlight=False,
        markup=False,
    )


@viz.command("activations")
@exits_cleanly
def activations_cli(
    image: Annotated[Path, typer.Argument(help="One image.")],
    layer: Annotated[str, typer.Option("--layer", "-l", help="Layer whose feature maps are drawn.")],
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("activations.png"),
    device: DeviceOpt = "auto",
) -> None:
    """Draw a layer's feature maps for one image, one tile per channel.

    Examples:

      retrieve viz activations cat.jpg --weights runs/r8/best.pt --layer layer1 --out acts.png
    """
    from retrieval.visualise import activations, load_model
    from retrieval.visualise.render import save_png

    vm = load_model(backbone, weights)
    grid = activations(vm, image, layer, device=device)
    save_png(grid.image, out)
    k, h, w = grid.maps.shape
    console.print(f"{layer} ({grid.node}): {k} maps of {h}x{w} -> {out}", highlight=False, markup=False)


@viz.command("top-patches")
@exits_cleanly
def top_patches_cli(
    images: Annotated[Path, typer.Argument(help="A folder of images (scanned recursively).")],
    layer: Annotated[str, typer.Option("--layer", "-l", help="Convolutional layer.")],
    channel: Annotated[int, typer.Option("--channel", "-c", help="Channel of --layer.")],
    n: Annotated[int, typer.Option("-n", "--count", help="How many patches.")] = 10,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid of the patches.")] = Path("patches.png"),
    device: DeviceOpt = "auto",
) -> None:
    """Find the receptive-field patches of a dataset that excite one channel most.

    Examples:

      retrieve viz top-patches ./photos --weights runs/r8/best.pt --layer layer3 --channel 5 -n 10
    """
    from rich.table import Table
    from rich.text import Text

    from retrieval.visualise import load_model, top_patches
    from retrieval.visualise.render import save_png

    vm = load_model(backbone, weights)
    result = top_patches(vm, images, layer, channel, n=n, batch_size=batch_size, device=device)
    save_png(result.image, out)
    title = f"{layer} ({result.node}) channel {channel}: top {len(result.patches)} of {result.images} images"
    table = Table(title=Text(title))
    for col in ("#", "file", "activation", "unit (y, x)", "patch (top, left, bottom, right)"):
        table.add_column(col)
    for i, p in enumerate(result.patches, start=1):
        # Text, not str: a file called "[red]x.png" must print as itself, not as rich markup.
        table.add_row(str(i), Text(p.relpath), f"{p.score:.3f}", f"{p.position}", f"{p.box}")
    console.print(table, highlight=False)
    console.print(f"-> {out}", highlight=False, markup=False)
    _report_skipped(result.skipped)
