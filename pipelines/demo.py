"""The demo job: sample images -> a small convnet trained on CPU -> pixel and feature indexes -> eval, sheet, map.

Every step writes under one folder and is skipped on a re-run when its output exists for the same
settings, so `retrieve demo` twice costs seconds the second time.

Evaluation protocol: the network is trained on the train split only (no validation split, so no
checkpoint is chosen by looking at held-out images); the test split's images then query an index
of the train split, in each space. Leave-one-out over the train split would flatter the trained
network, which has seen those very images.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrieval.evaluate import DEFAULT_KS, SpaceResult
from retrieval.paths import user_path
from retrieval.progress import Progress
from retrieval.samples import SampleConfig

PIXELS = "pixels"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `retrieve demo`; the defaults are measured to finish in about 2.5 minutes on 2 CPU cores."""

    out: Path  # everything goes below this folder
    per_class: int = 1000  # training images per class (8 shape classes): data, more than epochs, helps
    test_per_class: int = 25  # held-out query images per class
    image_size: int = 64  # side of the generated images in px
    # LeNet-5 learns these shapes faster per CPU-second than resnet8_small (10x the images/s; measured
    # 67% held-out accuracy after 30 epochs of 8k images in ~40 s on 2 cores), see bench/RESULTS.md.
    arch: str = "lenet"  # registry name of the network trained from scratch
    train_size: int | None = None  # training input side in px; None = the architecture's default (32)
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"
    ks: tuple[int, ...] = DEFAULT_KS  # cut-offs in the eval table
    sheet_queries: int = 8  # query images on the neighbours sheet (one per class)
    sheet_k: int = 8  # neighbours per query and space on the sheet
    device: str = "auto"
    seed: int = 0
    map: bool = True  # write the map of the trained space (as `retrieve map` does)
    # A third space: ImageNet features of this backbone, frozen (the weights install with the
    # package). The lecture's slide: features learned on photos, never shown these shapes. None: skip.
    pretrained: str | None = "efficientnet_lite0"
    fresh: bool = False  # redo every step


class DemoProgress(Progress):
    """The progress protocol plus a line per step; the CLI prints them, tests ignore them."""

    def step(self, text: str) -> None:
        """A step of the demo begins (its notes follow)."""


@dataclass(frozen=True)
class DemoReport:
    """Where everything went, the eval results and the time each step took."""

    out: Path
    images: Path
    checkpoint: Path
    indexes: dict[str, Path]  # space name -> index of the train split
    test_indexes: dict[str, Path]  # space name -> index of the test split (the queries)
    results: list[SpaceResult]
    caption: str
    sheet: Path
    sheet_png: Path
    map: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    reused: tuple[str, ...] = ()  # steps skipped because their output was there
    arch: str = "lenet"
    epochs: int = 30  # that the network was trained for

    @property
    def trained(self) -> str:
        """The name of the trained space (`ARCH-trained`; else the last space, which run_demo puts last)."""
        name = f"{self.arch}-trained"
        return name if name in self.indexes else list(self.indexes)[-1]

    def summary(self) -> str:
        """The closing words: where things are and what to try next."""
        pix, net = self.indexes[PIXELS], self.indexes[self.trained]
        others = [p for n, p in self.indexes.items() if n not in (PIXELS, self.trained)]
        test = self.images / "test"
        example = sorted((test / "star").glob("*.png"))[:1] or sorted(test.rglob("*.png"))[:1]
        lines = [
            "",
            f"demo finished in {sum(self.seconds.values()):.0f}s"
            + (f" (reused: {', '.join(self.reused)})" if self.reused else ""),
            f"  images      {self.images}  (train/ and test/, 8 shape classes)",
            f"  model       {self.checkpoint}",
            f"  indexes     {'  '.join(str(p) for p in [pix, *others, net])}",
            f"              (the train split; the test split's are in {self.out / 'indexes' / 'test'})",
            f"  sheet       {self.sheet}  (+ {self.sheet_png.name})",
        ]
        if self.map is not None:
            lines.append(f"  map         {self.map}")
        lines += [
            "",
            "next:",
            f"  retrieve query {example[0] if example else test} --index {net}",
            f"  retrieve eval {' '.join(str(p) for p in [pix, *others, net])} --queries {test} -k 1,5,10",
            f"  retrieve neighbours {' '.join(str(p) for p in [pix, *others, net])} --queries {test} -n 8 -k 5 --out sheet.html",
        ]
        if self.map is not None:
            lines.append(f"  retrieve map {net}")
        lines += [
            f"  retrieve index ./your-images --weights {self.checkpoint}",
            f"  retrieve train {self.images / 'train'} --arch {self.arch} --epochs {2 * self.epochs}"
            f"   # twice the demo's {self.epochs} epochs",
        ]
        return "\n".join(lines)


def _stamp_matches(path: Path, payload: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == payload
    except (OSError, json.JSONDecodeError):
        return False


def _write_stamp(path: Path, payload: dict[str, Any]) -> None:
    from retrieval.atomic import atomic_write

    data = json.dumps(payload, indent=2, sort_keys=True).encode()
    atomic_write(path, lambda fh: fh.write(data))


def _samples(config: DemoConfig, images: Path, progress: DemoProgress) -> bool:
    """Generate the shapes; returns True when reused."""
    from retrieval.samples import make_samples

    sample_config = SampleConfig(
        per_class=config.per_class,
        test_per_class=config.test_per_class,
        size=config.image_size,
        seed=config.seed,
    )
    stamp = images / ".samples.json"  # hidden: never scanned as an image
    payload = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(sample_config).items()}
    if not config.fresh and _stamp_matches(stamp, payload):
        return True
    progress.step(f"generating {len(sample_config.classes)} classes of shapes in {images}")
    make_samples(images, sample_config)
    _write_stamp(stamp, payload)
    return False


def _train(config: DemoConfig, images: Path, run_dir: Path, progress: DemoProgress) -> tuple[Path, bool]:
    """Train the small convnet on the train split; returns (checkpoint, reused)."""
    from retrieval.training import TrainConfig, TrainReporter, train

    train_config = TrainConfig(
        data=images / "train",
        out=run_dir,
        arch=config.arch,
        image_size=config.train_size,
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        val_fraction=0.0,  # the test split stays unseen: no checkpoint is picked with it
        seed=config.seed,
        device=config.device,
        overwrite=True,
    )
    payload = {k: v for k, v in train_config.to_dict().items() if k not in ("device", "overwrite", "workers")}
    stamp = run_dir / "demo.json"
    checkpoint = run_dir / "best.pt"
    if not config.fresh and checkpoint.is_file() and _stamp_matches(stamp, payload):
        return checkpoint, True
    stamp.unlink(missing_ok=True)
    progress.step(f"training {config.arch} on {images / 'train'} for {config.epochs} epochs")

    class Reporter(TrainReporter):
        def message(self, text: str) -> None:
            progress.note(text)

        def epoch(self, stats: Any) -> None:
            progress.note(
                f"epoch {stats.epoch}/{stats.epochs}  loss {stats.train_loss:.3f}  "
                f"train accuracy {stats.train_acc:.1%}  {stats.images_per_s:,.0f} img/s  "
                f"{stats.epoch_seconds:.1f}s"
            )

    result = train(train_config, Reporter())
    if result.interrupted:
        from retrieval.errors import RetrieveError

        raise RetrieveError("Training was interrupted; run `retrieve demo` again to start it over.")
    _write_stamp(stamp, payload)
    return result.best_checkpoint, False


def _index(
    images: Path,
    index: Path,
    backbone: str | None,
    weights: str | None,
    config: DemoConfig,
    progress: DemoProgress,
    name: str,
) -> bool:
    """Index a folder unless an index of it with the same weights is there; returns True when reused."""
    from pipelines.index_folder import build_index
    from retrieval.backbones import load_backbone
    from retrieval.config import IndexConfig
    from retrieval.store import read_manifest

    if not config.fresh and (index / "manifest.json").exists():
        try:
            manifest = read_manifest(index)
            sha = load_backbone(backbone, weights).weights.sha256
            if manifest.weights.sha256 == sha and Path(manifest.root) == images.absolute():
                return True
        except Exception:  # an unreadable index is rebuilt below
            pass
    progress.step(f"indexing {images} with {name} -> {index}")
    build_index(
        IndexConfig(images=images, index=index, backbone=backbone, weights=weights, device=config.device)
    )
    return False


def _write_map(index: Path, out: Path, progress: DemoProgress) -> Path | None:
    """The map of the trained space (`retrieve map`); a clear library error skips it with a note."""
    from retrieval.api import open_index
    from retrieval.errors import RetrieveError
    from retrieval.maps import MapConfig, build_map

    progress.step(f"drawing the map of {index.name} -> {out}")
    try:
        # A stratified sample keeps t-SNE to seconds; the page still shows every class.
        build_map(open_index(index), MapConfig(out=out, max_points=2000), note=progress.note)
    except RetrieveError as exc:  # the map is a bonus: the demo's result stands without it
        progress.note(f"map skipped: {exc.for_cli()}")  # the demo speaks to the command line
        return None
    return out


def _evaluate(
    config: DemoConfig, indexes: list[Path], test_indexes: list[Path], progress: DemoProgress
) -> tuple[list, list, list[SpaceResult]]:
    """Test images as queries against the train split, in each space: (databases, queries, results)."""
    from retrieval.api import open_index
    from retrieval.evaluate import QuerySet, evaluate_indexes

    progress.step("evaluating: test images as queries against the train split, in each space")
    db = [open_index(p) for p in indexes]
    queries = []
    for path in test_indexes:
        q = open_index(path)
        queries.append(QuerySet(np_vectors(q), list(q.labels), list(q.paths)))
    return db, queries, evaluate_indexes(db, queries, ks=config.ks)


def _spaces(config: DemoConfig, trained: str, checkpoint: Path) -> dict[str, tuple[str | None, str | None]]:
    """Space name -> (backbone, weights): pixels, frozen ImageNet features if asked, the trained net last."""
    spaces: dict[str, tuple[str | None, str | None]] = {PIXELS: (PIXELS, None)}
    if config.pretrained:
        spaces[f"{config.pretrained}-imagenet"] = (config.pretrained, "imagenet")
    spaces[trained] = (None, str(checkpoint))
    return spaces


def _caption(config: DemoConfig, n_queries: int, n_db: int) -> str:
    """The table's caption: what queried what, and how each space was made."""
    frozen = f"; {config.pretrained} with ImageNet weights, frozen" if config.pretrained else ""
    return (
        f"{n_queries} test images querying {n_db} training images "
        f"(8 shape classes; {config.arch} trained {config.epochs} epochs on the train split{frozen})"
    )


def run_demo(config: DemoConfig, progress: DemoProgress | None = None) -> DemoReport:
    """Run (or resume) the whole demo under `config.out`."""
    from retrieval.sheet import neighbour_blocks, write_sheet

    progress = progress or DemoProgress()
    out = user_path(config.out).absolute()
    # One model folder per architecture: each trained index records its checkpoint's path, so a
    # demo run with another --arch must not overwrite the one an earlier index was built with.
    images, run_dir, index_root = out / "images", out / "model" / config.arch, out / "indexes"
    seconds: dict[str, float] = {}
    reused: list[str] = []

    t = time.perf_counter()
    if _samples(config, images, progress):
        reused.append("images")
    seconds["images"] = time.perf_counter() - t

    t = time.perf_counter()
    checkpoint, was_reused = _train(config, images, run_dir, progress)
    if was_reused:
        reused.append("model")
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    trained = f"{config.arch}-trained"
    spaces = _spaces(config, trained, checkpoint)
    indexes = {name: index_root / name for name in spaces}
    test_indexes = {name: index_root / "test" / name for name in spaces}
    all_reused = True
    for name, (backbone, weights) in spaces.items():
        all_reused &= _index(images / "train", indexes[name], backbone, weights, config, progress, name)
        all_reused &= _index(images / "test", test_indexes[name], backbone, weights, config, progress, name)
    if all_reused:
        reused.append("indexes")
    seconds["index"] = time.perf_counter() - t

    t = time.perf_counter()
    db, queries, results = _evaluate(
        config, [indexes[n] for n in spaces], [test_indexes[n] for n in spaces], progress
    )
    caption = _caption(config, queries[0].vectors.shape[0], len(db[0]))
    seconds["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    progress.step("writing the neighbours sheet")
    blocks = neighbour_blocks(
        db, queries, images / "test", n=config.sheet_queries, k=config.sheet_k, seed=config.seed
    )
    sheet, sheet_png = write_sheet(
        blocks,
        out / "neighbours.html",
        title="Test images and their nearest training images: pixel space vs "
        + ("ImageNet features vs " if config.pretrained else "")
        + "trained features",
    )
    seconds["sheet"] = time.perf_counter() - t

    map_path = None
    if config.map:
        t = time.perf_counter()
        map_path = _write_map(indexes[trained], out / "map.html", progress)
        seconds["map"] = time.perf_counter() - t

    return DemoReport(
        out=out,
        images=images,
        checkpoint=checkpoint,
        indexes=indexes,
        test_indexes=test_indexes,
        results=results,
        caption=caption,
        sheet=sheet,
        sheet_png=sheet_png,
        map=map_path,
        seconds=seconds,
        reused=tuple(reused),
        arch=config.arch,
        epochs=config.epochs,
    )


def np_vectors(index: Any) -> Any:
    import numpy as np

    return np.asarray(index.vectors(), dtype=np.float32)
