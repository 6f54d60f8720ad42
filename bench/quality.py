"""Benchmark retrieval quality (trained features vs raw pixels) and the speed of `retrieve eval`.

Hardware is printed in the header. Each part measures our path and its baseline in one run:
  samples    the `retrieve demo` job (shapes): P@10 of the trained features vs pixel space (target >= 2x)
  cifar10    --arch (default resnet8_small) trained with `retrieve train` on the train split, or
             --weights CKPT trained elsewhere; the test split indexed with pixels and with the trained
             net, leave-one-out P@10, MAP@R, kNN@k; --train-db adds test queries against the train split;
             --tta adds the net with mirror-averaged embeddings (`index --tta`) as a third space
  mnist      the same on MNIST (PNGs written from ../shared/datasets/mnist.npz)
  pretrained real photos (hymenoptera: ants and bees) and CIFAR-10 upscaled to 224 px: pixels, the
             frozen ImageNet backbone (--lite, default efficientnet_lite0) and the same fine-tuned on the
             train split (`retrieve train --pretrained imagenet`, --epochs); test queries against the
             train split, P@10, MAP@R, kNN@10 (--train-per-class/--test-per-class size the CIFAR subset)
  synthetic  `evaluate_vectors` leave-one-out on 50k x 512-d vs the FAISS search alone (the floor)
             and a Python loop of one search per query (extrapolated from a sample)

    python bench/quality.py samples|cifar10|mnist|pretrained|synthetic [--epochs N] [--train-per-class N]
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from retrieval.device import machine_summary

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def table(rows: list[tuple[str, dict[str, float]]], names: list[str]) -> None:
    print(f"{'space':<28}" + "".join(f"{n:>12}" for n in names))
    for name, m in rows:
        print(f"{name:<28}" + "".join(f"{m[n]:>12.4f}" for n in names))


def bench_samples(args: argparse.Namespace) -> None:
    from pipelines.demo import DemoConfig, run_demo

    out = Path(args.workdir or tempfile.mkdtemp(prefix="quality-demo-"))
    t = time.perf_counter()
    report = run_demo(DemoConfig(out=out, device="cpu"))
    wall = time.perf_counter() - t
    print(
        f"demo wall time {wall:.1f}s, steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    )
    print(report.caption)
    names = ["P@1", "P@5", "P@10", "MAP@R", "mAP", "kNN@10"]
    table([(r.name, r.metrics) for r in report.results], names)
    by_name = {r.name: r.metrics for r in report.results}
    pix, net = by_name["pixels"], by_name[report.trained]
    ratio = net["P@10"] / pix["P@10"]
    print(f"P@10 trained / pixels = {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
    for name, m in by_name.items():
        if name.endswith("-imagenet"):
            print(f"P@10 {name} (frozen) / pixels = {m['P@10'] / pix['P@10']:.2f}x")


def _train_and_eval(data: Path, args: argparse.Namespace, channels: int | None, flip: bool) -> None:
    from retrieval.training import TrainConfig, train

    work = data.parent / f"{data.name}-quality"
    if args.weights:
        # A checkpoint trained elsewhere on the train split only (e.g. `bench/train.py cifar --full`'s
        # last.pt: the final epoch, not picked by its test accuracy).
        _index_and_eval(data, work, args.arch, Path(args.weights), args.train_db, args.tta)
        return
    t = time.perf_counter()
    result = train(
        TrainConfig(
            data=data / "train",
            out=work / "run",
            arch=args.arch,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer="adamw",
            val_fraction=0.0,  # the test split stays unseen until evaluation
            channels=channels,
            flip=flip,
            device="cpu",
            overwrite=True,
        )
    )
    train_s = time.perf_counter() - t
    last = result.history[-1]
    print(
        f"trained {args.arch} {result.epochs_completed} epochs in {train_s:.0f}s "
        f"({last.images_per_s:,.0f} img/s, final train accuracy {last.train_acc:.1%})"
    )
    _index_and_eval(data, work, args.arch, result.best_checkpoint, args.train_db, args.tta)


def _index_split(
    data: Path, split: str, work: Path, prefix: str, arch: str, checkpoint: Path, tta: bool = False
) -> list:
    """Index `data/split` with pixels and with the checkpoint (and with the checkpoint and `--tta`,
    mirror-averaged embeddings, when asked); the opened indexes, in that order."""
    from pipelines.index_folder import build_index
    from retrieval.api import open_index
    from retrieval.config import IndexConfig

    indexes = []
    spaces = [("pixels", "pixels", None, False), (arch, None, str(checkpoint), False)]
    if tta:
        spaces.append((f"{arch}-tta", None, str(checkpoint), True))
    for name, backbone, weights, flip in spaces:
        t = time.perf_counter()
        r = build_index(
            IndexConfig(
                images=data / split,
                index=work / f"{prefix}{name}",
                backbone=backbone,
                weights=weights,
                tta=flip,
            )
        )
        print(f"indexed {split} split with {name}: {r.indexed} images in {time.perf_counter() - t:.1f}s")
        indexes.append(open_index(r.index))
    return indexes


def _index_and_eval(
    data: Path, work: Path, arch: str, checkpoint: Path, train_db: bool = False, tta: bool = False
) -> None:
    from retrieval.evaluate import evaluate_indexes

    indexes = _index_split(data, "test", work, "idx-", arch, checkpoint, tta)
    t = time.perf_counter()
    results = evaluate_indexes(indexes, ks=(1, 10))
    print(f"eval (leave-one-out over the test split) in {time.perf_counter() - t:.1f}s")
    table([(r.name, r.metrics) for r in results], ["P@10", "MAP@R", "mAP", "kNN@1", "kNN@10"])
    if train_db:
        _train_db_eval(data, work, arch, checkpoint, tta)


def _train_db_eval(data: Path, work: Path, arch: str, checkpoint: Path, tta: bool = False) -> None:
    """The usual kNN protocol (the ~35-40% pixel reference): the train split is the database, the test
    split the queries."""
    from retrieval.evaluate import embed_query_folder, evaluate_indexes

    indexes = _index_split(data, "train", work, "idx-train-", arch, checkpoint, tta)
    queries = [embed_query_folder(index, data / "test") for index in indexes]
    t = time.perf_counter()
    results = evaluate_indexes(indexes, queries, ks=(1, 5, 10, 20))
    print(f"eval (test queries against the train split) in {time.perf_counter() - t:.1f}s")
    names = ["P@10", "MAP@R", "kNN@1", "kNN@5", "kNN@10", "kNN@20"]
    table([(r.name, r.metrics) for r in results], names)


def bench_cifar10(args: argparse.Namespace) -> None:
    root = Path("/tmp/cifar10")
    if not (root / "test").is_dir():
        t = time.perf_counter()
        with tarfile.open(DATASETS / "cifar10-jpg.tar") as tar:
            tar.extractall(root, filter="data")
        print(f"extracted CIFAR-10 to {root} in {time.perf_counter() - t:.0f}s")
    data = _subset(root, args.train_per_class)
    _train_and_eval(data, args, channels=3, flip=True)


def _subset(root: Path, per_class: int | None) -> Path:
    """`root` itself, or a folder of symlinks holding `per_class` training images per class + all test."""
    if not per_class:
        return root
    sub = root.parent / f"{root.name}-{per_class}"
    if not sub.exists():
        for cls in sorted(p.name for p in (root / "train").iterdir()):
            (sub / "train" / cls).mkdir(parents=True)
            for f in sorted((root / "train" / cls).iterdir())[:per_class]:
                (sub / "train" / cls / f.name).symlink_to(f)
        (sub / "test").symlink_to(root / "test")
    return sub


def bench_mnist(args: argparse.Namespace) -> None:
    from PIL import Image

    root = Path("/tmp/mnist-png")
    if not (root / "test").is_dir():
        t = time.perf_counter()
        d = np.load(DATASETS / "mnist.npz")
        for split in ("train", "test"):
            x, y = d[f"x_{split}"], d[f"y_{split}"]
            for label in range(10):
                (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            for i, (img, label) in enumerate(zip(x, y, strict=True)):
                Image.fromarray(img).save(root / split / str(int(label)) / f"{i:05d}.png")
        print(f"wrote MNIST PNGs to {root} in {time.perf_counter() - t:.0f}s")
    data = _subset(root, args.train_per_class)
    _train_and_eval(data, args, channels=1, flip=False)


def _extract(tar_name: str, root: Path) -> None:
    if not root.is_dir():
        t = time.perf_counter()
        with tarfile.open(DATASETS / tar_name) as tar:
            tar.extractall(root, filter="data")
        print(f"extracted {tar_name} to {root} in {time.perf_counter() - t:.0f}s")


def _split_view(train: Path, test: Path, view: Path, train_n: int | None, test_n: int | None) -> Path:
    """A folder of symlinks, view/train/<class> and view/test/<class>, with at most n files a class."""
    if not view.exists():
        for split, src, n in (("train", train, train_n), ("test", test, test_n)):
            for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
                (view / split / cls).mkdir(parents=True)
                for f in sorted((src / cls).iterdir())[:n]:
                    (view / split / cls / f.name).symlink_to(f)
    return view


def _pretrained_spaces(data: Path, lite: str, args: argparse.Namespace, augment: str = "auto") -> None:
    """Pixels, frozen ImageNet features and the fine-tuned net: test queries against the train split."""
    from pipelines.index_folder import build_index
    from retrieval.api import open_index
    from retrieval.config import IndexConfig
    from retrieval.evaluate import embed_query_folder, evaluate_indexes
    from retrieval.training import TrainConfig, train

    work = data.parent / f"{data.name}-pretrained"
    t = time.perf_counter()
    result = train(
        TrainConfig(
            data=data / "train",
            out=work / "run",
            arch=lite,
            pretrained="imagenet",
            epochs=args.ft_epochs,  # None: the backbone's fine-tuning recipe
            augment=augment,
            val_fraction=0.0,  # the test split stays unseen until evaluation
            device="cpu",
            overwrite=True,
        )
    )
    last = result.history[-1]
    print(
        f"fine-tuned {lite} {result.epochs_completed} epochs in {time.perf_counter() - t:.0f}s "
        f"({last.images_per_s:,.1f} img/s, final train accuracy {last.train_acc:.1%})"
    )
    spaces = [
        ("pixels", "pixels", None),
        (f"{lite} frozen", lite, "imagenet"),
        (f"{lite} fine-tuned", None, str(result.best_checkpoint)),
    ]
    indexes = []
    for name, backbone, weights in spaces:
        t = time.perf_counter()
        folder = work / f"idx-{name.replace(' ', '-')}"
        r = build_index(IndexConfig(images=data / "train", index=folder, backbone=backbone, weights=weights))
        print(f"indexed the train split with {name}: {r.indexed} images in {time.perf_counter() - t:.1f}s")
        indexes.append(open_index(r.index))
    queries = [embed_query_folder(index, data / "test") for index in indexes]
    results = evaluate_indexes(indexes, queries, ks=(10,))
    print(f"{len(queries[0].labels)} test queries against {len(indexes[0])} training images:")
    names = ["P@10", "MAP@R", "kNN@10"]
    table([(name, r.metrics) for (name, _, _), r in zip(spaces, results, strict=True)], names)
    pix, frozen, tuned = (r.metrics for r in results)
    print(
        f"P@10 frozen / pixels = {frozen['P@10'] / pix['P@10']:.2f}x; "
        f"fine-tuned - frozen = {tuned['P@10'] - frozen['P@10']:+.3f} P@10, "
        f"{tuned['MAP@R'] - frozen['MAP@R']:+.3f} MAP@R"
    )


def bench_pretrained(args: argparse.Namespace) -> None:
    lite = args.lite
    _extract("hymenoptera-jpg.tar", Path("/tmp/hymenoptera-q"))
    hym = Path("/tmp/hymenoptera-q/hymenoptera")
    print("== hymenoptera (real photos, 2 classes)")
    _pretrained_spaces(_split_view(hym / "train", hym / "val", Path("/tmp/hym-view"), None, None), lite, args)
    _extract("cifar10-jpg.tar", Path("/tmp/cifar10"))
    train_n, test_n = args.train_per_class or 100, args.test_per_class
    print(f"== CIFAR-10 ({train_n} train and {test_n} test images a class, 32 px upscaled)")
    view = Path(f"/tmp/cifar10-view-{train_n}-{test_n}")
    # 32 px images upscaled: a random resized crop would zoom into a few blurred pixels.
    data = _split_view(Path("/tmp/cifar10/train"), Path("/tmp/cifar10/test"), view, train_n, test_n)
    _pretrained_spaces(data, lite, args, augment="crop")


def bench_synthetic(args: argparse.Namespace) -> None:
    from retrieval.evaluate import evaluate_vectors
    from retrieval.index import ExactIndex

    n, d = args.n, 512
    for classes in (100, 10):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, classes, n)
        x = (rng.normal(0, 1, (classes, d))[labels] + rng.normal(0, 3, (n, d))).astype(np.float32)
        names = [str(c) for c in labels]
        t = time.perf_counter()
        res = evaluate_vectors(x, names, ks=(1, 5, 10))
        ours = time.perf_counter() - t
        depth = max(10, int(np.bincount(labels).max()))
        t = time.perf_counter()
        index = ExactIndex(metric="l2").fit(x)
        index.search(x, depth + 1)
        floor = time.perf_counter() - t
        sample = 200
        t = time.perf_counter()
        for i in range(sample):
            index.search(x[i : i + 1], depth + 1)
        loop = (time.perf_counter() - t) * n / sample
        print(
            f"{n:,} x {d}-d, {classes} classes (R ~ {n // classes}): eval {ours:.1f}s "
            f"(P@10 {res.metrics['P@10']:.3f}, MAP@R {res.metrics['MAP@R']:.3f}); one batched FAISS "
            f"search of depth {depth + 1} alone {floor:.1f}s; per-query Python loop ~{loop:.0f}s "
            f"(extrapolated from {sample}) = {loop / ours:.1f}x slower"
        )
        for note in res.notes:
            print("  note:", note)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["samples", "cifar10", "mnist", "pretrained", "synthetic"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--arch", default="resnet8_small")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--train-db", action="store_true", help="cifar10/mnist: also test queries against the train split"
    )
    parser.add_argument(
        "--weights", default=None, help="cifar10/mnist: evaluate this checkpoint, no training"
    )
    parser.add_argument("--train-per-class", type=int, default=None, help="subset of the train split")
    parser.add_argument(
        "--tta", action="store_true", help="cifar10/mnist: also index with mirror-averaged embeddings"
    )
    parser.add_argument(
        "--test-per-class", type=int, default=50, help="pretrained: CIFAR-10 test queries a class"
    )
    parser.add_argument("--ft-epochs", type=int, default=None, help="pretrained: fine-tuning epochs (recipe)")
    parser.add_argument("--lite", default="efficientnet_lite0", help="pretrained: the ImageNet backbone")
    parser.add_argument("--n", type=int, default=50_000, help="synthetic: vectors")
    parser.add_argument("--workdir", default=None, help="samples: demo folder (reused when it exists)")
    args = parser.parse_args()
    print(machine_summary())
    parts = {
        "samples": bench_samples,
        "cifar10": bench_cifar10,
        "mnist": bench_mnist,
        "pretrained": bench_pretrained,
        "synthetic": bench_synthetic,
    }
    parts[args.part](args)


if __name__ == "__main__":
    main()
