"""Benchmark `retrieve train`: loop overhead vs a bare PyTorch loop, and time-to-accuracy curves.

    python bench/train.py overhead            # steps/s: train() vs a bare loop, same model/batch/data
    python bench/train.py samples             # small ResNet on the generated shapes, to its target
    python bench/train.py mnist  [--budget S] # LeNet-5 on MNIST (../shared/datasets/mnist.npz), to 99%
    python bench/train.py cifar  [--budget S] # --arch on CIFAR-10 (cifar10-jpg.tar), to 90%; airnet_small
                                              # runs its registry recipe unless flags override it
    python bench/train.py speed               # training images/s of resnet18/50 at 224 px (GPU)

Run each under `flock /tmp/cpu.lock` on a shared machine. Every mode prints `machine_summary()`
first and a JSON line of results last (with the per-epoch curve), for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retrieval.backbones import get_spec
from retrieval.device import machine_summary, resolve_runtime
from retrieval.errors import as_flags
from retrieval.training import EpochStats, TrainConfig, TrainReporter, train, with_recipe

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


class Curve(TrainReporter):
    """Prints each epoch; optionally stops the run (like Ctrl-C) once `target` or `budget` is hit."""

    def __init__(self, target: float | None = None, budget: float | None = None, stop: bool = True) -> None:
        self.target, self.budget, self.stop = target, budget, stop
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.reached: float | None = None

    def message(self, text: str) -> None:
        print(f"  . {as_flags(text)}", flush=True)  # library messages name settings «like_this»

    def epoch(self, s: EpochStats) -> None:
        wall = time.perf_counter() - self.t0
        self.rows.append(
            {"epoch": s.epoch, "wall_s": round(wall, 1), "val_acc": s.val_acc, "img_s": round(s.images_per_s)}
        )
        print(
            f"  epoch {s.epoch:3d}/{s.epochs}  loss {s.train_loss:.3f}  train {s.train_acc:.3f}  "
            f"val {s.val_acc:.4f}  {s.images_per_s:,.0f} img/s  wall {wall:6.1f}s",
            flush=True,
        )
        if self.target is not None and self.reached is None and (s.val_acc or 0) >= self.target:
            self.reached = wall
        over = self.budget is not None and wall > self.budget
        if over or (self.stop and self.reached is not None and self.target is not None):
            signal.raise_signal(signal.SIGINT)  # the loop's own clean stop: finish, save, return


def run_curve(config: TrainConfig, target: float | None, budget: float | None, stop: bool = True) -> dict:
    curve = Curve(target, budget, stop)
    result = train(config, curve)
    config = with_recipe(config)  # what actually ran: the architecture's recipe filled in
    return {
        "arch": config.arch,
        "config": {k: v for k, v in config.to_dict().items() if k not in ("data", "out", "resume")},
        "epochs_scheduled": config.epochs,
        "epochs_run": result.epochs_completed,
        "best_val_acc": result.best_val_acc,
        "target": target,
        "time_to_target_s": None if curve.reached is None else round(curve.reached, 1),
        "total_s": round(result.seconds, 1),
        "curve": curve.rows,
    }


# --------------------------------------------------------------------------------------------


def overhead(args: argparse.Namespace) -> dict:
    """train()'s steps/s (training phase, from its own epoch stats) vs a bare loop, ABAB in one run."""
    from retrieval.samples import SampleConfig, make_samples
    from retrieval.training import make_optimizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = make_samples(tmp / "shapes", SampleConfig(per_class=256, test_per_class=0, size=32))
    bs, epochs = args.batch_size, args.epochs
    runtime = resolve_runtime("auto", "auto")

    def ours(augment: str) -> float:
        config = TrainConfig(
            data=data,
            out=tmp / f"run-{augment}",
            arch=args.arch,
            epochs=epochs,
            batch_size=bs,
            augment=augment,
            val_fraction=0.0,
            overwrite=True,
            workers=2,
        )
        result = train(config)
        # Epoch 1 includes warm-up (allocator, oneDNN kernel selection); the bare loop skips it too.
        ips = [h.images_per_s for h in result.history[1:]]
        return float(np.median(ips)) / bs

    # The bare loop: same decoded uint8 images in memory, same model, batch, optimiser, autocast.
    from retrieval.images import Transform
    from retrieval.preprocess import Preprocess
    from retrieval.training import decode_to_memory

    paths = sorted(p for p in (data / "train").rglob("*.png"))
    classes = sorted({p.parent.name for p in paths})
    labels = torch.tensor([classes.index(p.parent.name) for p in paths])
    images, _, _ = decode_to_memory(paths, Transform(Preprocess(size=32, resize=32)), 2)
    n = len(images) // bs * bs
    mean = images[:512].float().div(255).mean((0, 2, 3)).view(1, 3, 1, 1)
    std = images[:512].float().div(255).std((0, 2, 3)).view(1, 3, 1, 1)

    def bare() -> float:
        torch.manual_seed(0)
        model = get_spec(args.arch).builder(len(classes), 3)
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        cfg = TrainConfig(data=data, out=tmp, arch=args.arch, batch_size=bs)
        opt = make_optimizer(model, cfg)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        rates = []
        for _epoch in range(epochs):
            order = torch.randperm(len(images))[:n]
            t = time.perf_counter()
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                x = (images[idx].float().div_(255) - mean) / std
                if runtime.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with runtime.autocast():
                    loss = loss_fn(model(x).float(), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            rates.append((n // bs) / (time.perf_counter() - t))
        return float(np.median(rates[1:]))

    res: dict[str, list[float]] = {"bare": [], "ours_crop": [], "ours_none": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        res["bare"].append(bare())
        res["ours_crop"].append(ours("crop"))
        res["ours_none"].append(ours("none"))
        print("  ", {k: round(v[-1], 2) for k, v in res.items()}, flush=True)
    med = {k: float(np.median(v)) for k, v in res.items()}
    out = {
        "arch": args.arch,
        "batch": bs,
        "images": len(images),
        "runtime": runtime.describe(),
        "steps_per_s": {k: round(v, 2) for k, v in med.items()},
        "ours_crop_vs_bare": round(med["ours_crop"] / med["bare"], 3),
        "ours_none_vs_bare": round(med["ours_none"] / med["bare"], 3),
    }
    print(
        f"steps/s  bare {med['bare']:.2f}  ours (pad+crop+flip) {med['ours_crop']:.2f} "
        f"({out['ours_crop_vs_bare']:.0%})  ours (no augmentation) {med['ours_none']:.2f} "
        f"({out['ours_none_vs_bare']:.0%})"
    )
    return out


def samples(args: argparse.Namespace) -> dict:
    from retrieval.samples import SampleConfig, make_samples

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cfg = SampleConfig(per_class=args.per_class, test_per_class=50, size=32)
    t = time.perf_counter()
    data = make_samples(tmp / "shapes", cfg)
    print(f"  generated {8 * (cfg.per_class + 50)} images in {time.perf_counter() - t:.1f}s", flush=True)
    config = TrainConfig(
        data=data,
        out=tmp / "run",
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        channels=1,  # the shapes' colours are random: grey input learned ~2x faster in trials
        optimizer="adamw",
        lr=args.lr,
        workers=2,
    )
    out = run_curve(config, args.target, args.budget)
    out["per_class"] = args.per_class
    return out


def _write_pngs(x: np.ndarray, y: np.ndarray, classes: list[str], root: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        Image.fromarray(x[i]).save(root / classes[int(y[i])] / f"{i:05d}.png", compress_level=1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(len(x))))


def mnist(args: argparse.Namespace) -> dict:
    npz = np.load(DATASETS / "mnist.npz")
    classes = [str(c) for c in npz["classes"]] if "classes" in npz else [str(i) for i in range(10)]
    root = Path(tempfile.mkdtemp(prefix="bench-mnist-"))
    t = time.perf_counter()
    _write_pngs(npz["x_train"], npz["y_train"], classes, root / "train")
    _write_pngs(npz["x_test"], npz["y_test"], classes, root / "test")
    print(f"  wrote 70,000 PNGs in {time.perf_counter() - t:.1f}s", flush=True)
    config = TrainConfig(
        data=root,
        out=root / "run",
        arch="lenet",
        image_size=32,
        epochs=args.epochs,
        batch_size=args.batch_size,
        flip=False,  # digits are not mirror-symmetric
        augment="crop",
        optimizer="adamw",
        lr=args.lr,
        label_smoothing=0.0,
        workers=2,
    )
    return run_curve(config, 0.99, args.budget)


def cifar(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-cifar-"))
    t = time.perf_counter()
    if args.data is not None:  # an extracted copy: train/<class>, test/<class>
        top = Path(args.data)
    else:
        with tarfile.open(DATASETS / "cifar10-jpg.tar") as tar:
            tar.extractall(root, filter="data")
        top = next((p for p in [root, *root.iterdir()] if (p / "train").is_dir()), root)
    print(f"  extracted in {time.perf_counter() - t:.1f}s: {top}", flush=True)
    config = TrainConfig(
        data=top,
        out=root / "run",
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="sgd",
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        norm_bias_lr_scale=args.norm_bias_lr_scale,
        seed=args.seed,
        crop_pad=args.crop_pad,
        tta=args.tta,
        workers=args.workers,
        compile=args.compile,
    )
    return run_curve(config, args.target, args.budget, stop=not args.full)


def speed(args: argparse.Namespace) -> dict:
    """Training images/s through StepRunner (our augmentation included) vs a bare step, 224 px."""
    from retrieval.training import Augment, StepRunner, make_optimizer

    runtime = resolve_runtime("auto", "auto")
    out: dict = {"runtime": runtime.describe()}
    dev = runtime.device
    for arch in ("resnet18", "resnet50"):
        bs = args.batch_size
        torch.manual_seed(0)
        model = get_spec(arch).builder(1000, 3).to(dev)
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        cfg = TrainConfig(data=Path("."), out=Path("."), arch=arch, batch_size=bs)
        aug = Augment(
            "rrc", 224, 0, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), runtime.channels_last
        )
        step = StepRunner(model, make_optimizer(model, cfg), None, runtime, aug, 0.1, None, args.compile)
        x = torch.randint(0, 256, (bs, 3, 256, 256), dtype=torch.uint8, device=dev)
        y = torch.randint(0, 1000, (bs,), device=dev)
        gen = torch.Generator()

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(5):
            step(x, y, gen)
        sync()
        n = 20 if dev.type == "cuda" else 2
        t = time.perf_counter()
        for _ in range(n):
            step(x, y, gen)
        sync()
        ours = n * bs / (time.perf_counter() - t)
        xf = aug.eval(x)  # bare: pre-normalised input, no augmentation
        opt = make_optimizer(model, cfg)
        loss_fn = torch.nn.CrossEntropyLoss()
        for i in range(n + 5):
            if i == 5:
                sync()
                t = time.perf_counter()
            with runtime.autocast():
                loss = loss_fn(model(xf).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        bare = n * bs / (time.perf_counter() - t)
        out[arch] = {"batch": bs, "ours_img_s": round(ours), "bare_img_s": round(bare)}
        print(
            f"  {arch}: ours {ours:,.0f} img/s (rrc + flip in the step), bare {bare:,.0f} img/s", flush=True
        )
        del model, step, opt, x, xf
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["overhead", "samples", "mnist", "cifar", "speed"])
    parser.add_argument("--data", default=None, help="cifar mode: an extracted train/ + test/ folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--arch", default="resnet8_small")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--full", action="store_true", help="cifar: run the whole schedule past the target")
    parser.add_argument("--crop-pad", type=int, default=None)
    parser.add_argument(
        "--tta", action="store_true", default=None, help="cifar: flip test-time augmentation at validation"
    )
    parser.add_argument("--weight-decay", type=float, default=None)
    # Unset (None) = the architecture's recipe where it has one (airnet_small), else the general default.
    parser.add_argument("--schedule", default=None, choices=["cosine", "onecycle"])
    parser.add_argument("--warmup-epochs", type=float, default=None)
    parser.add_argument("--label-smoothing", type=float, default=None)
    parser.add_argument("--norm-bias-lr-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="cifar: seeds init, shuffling and augmentation")
    parser.add_argument("--budget", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--target", type=float, default=0.9, help="samples/cifar: val accuracy target")
    parser.add_argument("--per-class", type=int, default=1000, help="samples mode: training images per class")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    defaults = {
        "overhead": (5, 128, None),
        "samples": (25, 64, 3e-3),
        "mnist": (8, 128, 3e-3),
        "cifar": (7, 256, 0.2),
        "speed": (1, 256, None),
    }[args.mode]
    if args.mode == "cifar" and get_spec(args.arch).recipe:
        defaults = (None, None, None)  # its own recipe (bench/RESULTS.md) instead of the ResNet defaults
    args.epochs = args.epochs or defaults[0]
    args.batch_size = args.batch_size or defaults[1]
    args.lr = args.lr if args.lr is not None else defaults[2]
    print(machine_summary(), flush=True)
    print(
        f"mode {args.mode}: {vars(args)}  (threads {torch.get_num_threads()}, pid {os.getpid()})", flush=True
    )
    result = {"mode": args.mode, **globals()[args.mode](args)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
