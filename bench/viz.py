"""Benchmark `retrieve viz saliency`: batched guided backprop vs grad-cam's one-image-at-a-time loop.

Hardware is printed in the header. All rates are measured in this one run, on the same model
(resnet18, seeded random weights unless --weights says otherwise) and the same decoded images,
in interleaved rounds so that load from other processes hits every variant. Reported per variant:
the best round (least disturbed by other processes, as timeit takes the minimum) and the median:

  grad-cam loop   = pytorch-grad-cam's GuidedBackpropReLUModel.__call__ pattern, re-implemented:
                    per image, swap nn.ReLU for guided ReLU modules in the model, forward one image,
                    backward(retain_graph=True) with weight gradients on, read x.grad, swap back.
                    The guided ReLU is ours (faster than grad-cam's addcmul one), so the baseline
                    is if anything flattered
  ours, batch 1   = retrieval.visualise.Saliency (frozen private copy, input gradient only) fed one image
  ours, batched   = the same engine fed --batch-size images at a time (what `retrieve viz saliency` does)
  end to end      = saliency_folder: decode + batched saliency + PNG panels + HTML report

    flock /tmp/cpu.lock python bench/viz.py [--n 48] [--batch-size 16] [--rounds 5] [--bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from retrieval.device import machine_summary, resolve_runtime
from retrieval.images import Transform, load_tensor, scan
from retrieval.samples import SampleConfig, make_samples
from retrieval.visualise import Saliency, SaliencyConfig, Target, load_model, saliency_folder
from retrieval.visualise.probe import GuidedReLU


def header() -> str:
    return "# " + machine_summary()


def _swap(model: nn.Module, old: type[nn.Module], new: Callable[[], nn.Module]) -> None:
    for name, child in model.named_children():
        if isinstance(child, old):
            setattr(model, name, new())
        else:
            _swap(child, old, new)


class GradCamLoop:
    """The baseline: how pytorch-grad-cam's guided backprop processes images (one call per image)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = copy.deepcopy(model).eval().to(device)  # weights keep requires_grad=True, as there
        self.device = device

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _swap(self.model, nn.ReLU, GuidedReLU)
        x = image[None].to(self.device).requires_grad_(True)
        out = self.model(x)
        target = int(out.argmax())
        out[0, target].backward(retain_graph=True)
        grad = x.grad.detach().cpu()[0]
        _swap(self.model, GuidedReLU, nn.ReLU)
        return grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="images per variant and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--bf16", action="store_true", help="also time the batched engine under bf16 autocast"
    )
    args = parser.parse_args()

    print(header())
    vm = load_model(args.backbone, args.weights)
    fp32 = resolve_runtime(args.device, "float32")
    dev = fp32.device
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(1, -(-args.n // 8))
        root = make_samples(Path(tmp) / "img", SampleConfig(per_class=per_class, test_per_class=0, size=160))
        entries = scan(root)[0]
        for extra in entries[args.n :]:  # the folder holds exactly the images the other variants see
            extra.path.unlink()
        entries = entries[: args.n]
        tf = Transform(vm.preprocess)
        images = torch.stack([tf.normalize(load_tensor(e.path, tf)[0]) for e in entries])
        n = len(images)
        print(
            f"# {args.backbone} ({vm.name}), {n} images {tuple(images.shape[1:])}, guided backprop, "
            f"predicted class, {fp32.describe()}, batch {args.batch_size}, {args.rounds} interleaved rounds"
        )

        baseline = GradCamLoop(vm.model, dev)
        engine = Saliency(vm.model, "guided", Target.predicted(), runtime=fp32)
        engine_bf16 = Saliency(vm.model, "guided", runtime=resolve_runtime(args.device, "bfloat16"))

        # Same answer before timing anything: the comparison is between two ways to compute one thing.
        ref = torch.stack([baseline(images[i]) for i in range(2)])
        ours = engine(images[:2]).gradients
        err = float((ref - ours).abs().max() / ref.abs().max())
        cos = float(torch.nn.functional.cosine_similarity(ref.flatten(1), ours.flatten(1)).min())
        print(f"# check: batched vs grad-cam loop gradients: cosine {cos:.6f}, max diff {err:.1e} of the max")
        # float32 sums in another order (batched, channels_last) differ in the last bits, nothing more.
        assert cos > 0.9999, cos

        def loop_baseline() -> None:
            for i in range(n):
                baseline(images[i])

        def ours_batch1() -> None:
            for i in range(n):
                engine(images[i : i + 1])

        def ours_batched(eng: Saliency = engine) -> None:
            for i in range(0, n, args.batch_size):
                eng(images[i : i + args.batch_size])

        out = Path(tmp) / "out"

        def end_to_end() -> None:
            cfg = SaliencyConfig(method="guided", batch_size=args.batch_size, device=args.device)
            saliency_folder(vm, root, out, cfg)

        variants: dict[str, Callable[[], None]] = {
            "grad-cam loop (baseline)": loop_baseline,
            "ours, batch 1": ours_batch1,
            f"ours, batch {args.batch_size}": ours_batched,
            f"end to end, batch {args.batch_size} (decode+PNG+HTML)": end_to_end,
        }
        if args.bf16:
            variants[f"ours, batch {args.batch_size}, bf16 autocast"] = lambda: ours_batched(engine_bf16)
            bf = engine_bf16(images[:4]).gradients
            cos = torch.nn.functional.cosine_similarity(
                bf.flatten(1), engine(images[:4]).gradients.flatten(1)
            )
            print(f"# bf16 gradients vs float32: cosine similarity min {float(cos.min()):.4f}")
        ours_batched()  # warm-up: first-call allocations and oneDNN primitive creation
        baseline(images[0])
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.rounds):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()  # count the queued kernels too, not only their launch
                rates[name].append(n / (time.perf_counter() - t))
            print(f"# round {r + 1}: " + ", ".join(f"{v[-1]:.2f}" for v in rates.values()), flush=True)

    base = rates["grad-cam loop (baseline)"]
    best_base, med_base = max(base), statistics.median(base)
    # Also the median of the ratios within each round: load that lasts a round hits both sides.
    print(
        f"{'variant':<50} {'best img/s':>10} {'ratio':>6} {'median img/s':>12} {'ratio':>6} {'per-round':>9}"
    )
    for name, values in rates.items():
        best, med = max(values), statistics.median(values)
        paired = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(
            f"{name:<50} {best:10.2f} {best / best_base:5.2f}x {med:12.2f} {med / med_base:5.2f}x "
            f"{paired:8.2f}x"
        )


if __name__ == "__main__":
    main()
