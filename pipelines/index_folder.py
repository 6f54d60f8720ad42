"""The index job: scan a folder, decode in loader workers, embed on the device, write resumable shards."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.runner import StageTimer
from retrieval.config import IndexConfig
from retrieval.errors import EmptyInputError, RetrieveError
from retrieval.paths import user_path

if TYPE_CHECKING:
    from retrieval.images import Decoder, IsolationPolicy

ENGINES = ("local",)


@dataclass(frozen=True)
class IndexReport:
    """What a run did, for the CLI summary and for benchmarks."""

    index: Path
    indexed: int  # vectors in the committed index
    embedded: int  # embedded by this run (the rest were reused from an interrupted run)
    skipped: int  # files in the ledger
    seconds: float
    device: str
    backbone: str
    dim: int
    stages: dict[str, float] = field(default_factory=dict)
    skipped_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


class Progress:
    """Callbacks the job reports through; the CLI renders them with rich, tests ignore them."""

    def start(self, total: int, done: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def note(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def stop(self) -> None: ...


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip()


def _is_index_or_empty(folder: Path) -> bool:
    """An index (finished or staged), or a folder with nothing of the user's in it to overwrite."""
    from retrieval.images import is_index_dir

    if is_index_dir(folder):
        return True
    # Hidden files (.DS_Store, our .lock) and a mount point's lost+found are not the user's work.
    return not [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "lost+found"]


def build_index(
    config: IndexConfig,
    progress: Progress | None = None,
    *,
    decoder: Decoder | None = None,
    policy: IsolationPolicy | None = None,
) -> IndexReport:
    """Index every image below `config.images` into `config.index`; resumes an interrupted run.

    One run per index folder at a time: a second one fails at once (see `store.writer_lock`).
    `decoder` and `policy` go to `decode_all` (default: PIL, and its usual limits).
    """
    from retrieval.index import check_metric
    from retrieval.store import writer_lock

    # Checked before the lock, which creates the index folder.
    if config.engine not in ENGINES:
        raise RetrieveError(f"Unknown engine {config.engine!r}; available: {', '.join(ENGINES)}.")
    check_metric(config.metric)
    root = user_path(config.images).absolute()
    if not root.is_dir():
        raise EmptyInputError(f"{root} is not a folder.")
    index_dir = user_path(config.index).absolute()
    if index_dir.is_dir() and not _is_index_or_empty(index_dir):
        raise RetrieveError(
            f"{index_dir} is a folder with other files in it, not an index; give --index a new or empty "
            "folder (an index writes and replaces files of its own there)."
        )
    progress = progress or Progress()
    with writer_lock(index_dir, warn=progress.warn):
        return _build_index(config, root, index_dir, progress, decoder, policy)


def _build_index(
    config: IndexConfig,
    root: Path,
    index_dir: Path,
    progress: Progress | None,
    decoder: Decoder | None = None,
    policy: IsolationPolicy | None = None,
) -> IndexReport:
    from retrieval import __version__
    from retrieval.backbones import load_backbone
    from retrieval.device import resolve_runtime
    from retrieval.embed import default_batch_size, default_workers, forward, prepare_model
    from retrieval.images import (
        IMAGE_EXTENSIONS,
        Batch,
        IsolationPolicy,
        PILDecoder,
        Transform,
        decode_all,
        scan,
    )
    from retrieval.store import Manifest, Staging, WeightsRecord, commit

    progress = progress or Progress()
    t0 = time.perf_counter()
    timer = StageTimer()

    with timer.stage("load model"):
        runtime = resolve_runtime(config.device, config.dtype)
        backbone = load_backbone(config.backbone, config.weights, config.layer)
        # The pixel baseline is a resize and a flatten: no network, so no autocast or memory format.
        device = runtime.describe() if backbone.spec.builder else runtime.device.type
        progress.note(f"device: {device}")
        progress.note(
            f"backbone: {backbone.spec.name} ({backbone.layer or 'pixels'}) {backbone.dim}-d, "
            f"weights {backbone.weights.id}"
        )
        if backbone.weights.kind == "none":
            progress.warn(
                "weights: none: RANDOM initialisation (seed 0); neighbours will be close "
                "to meaningless. Use --weights imagenet or a trained checkpoint for real retrieval."
            )
        model = prepare_model(backbone, runtime)
        transform = Transform(backbone.preprocess)

    # Scanned after the model loads: a bad --backbone/--weights fails before a long scan.
    with timer.stage("scan"):
        entries, problems = scan(root)
    if not entries and not problems:
        raise EmptyInputError(
            f"No images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)."
        )

    manifest = Manifest(
        retrieve_version=__version__,
        root=str(root),
        backbone=backbone.spec.name,
        layer=backbone.layer,
        weights=WeightsRecord(backbone.weights.kind, backbone.weights.id, backbone.weights.sha256),
        checkpoint=str(Path(config.weights).absolute()) if backbone.weights.kind == "checkpoint" else None,
        preprocess=backbone.preprocess,
        dim=backbone.dim,
        metric=config.metric,
        tta=config.tta,
        dtype="float32" if runtime.autocast_dtype is None else str(runtime.autocast_dtype).split(".")[-1],
    )
    # Staged shards are reused only by a run that would compute the same vectors (and that wrote
    # the same shard layout).
    key = manifest.run_key()
    staging = Staging(index_dir, key, config.shard_rows)
    done = staging.open()
    todo = [
        e
        for e in entries
        if (d := done.get(e.relpath)) is None or (d.size, d.mtime, d.ctime) != (e.size, e.mtime, e.ctime)
    ]
    reused = len(entries) - len(todo)
    if reused:
        progress.note(f"resuming: {reused} files already handled by an interrupted run")
    # Staged every run, even for paths an earlier run embedded: the later shard wins at commit, so a
    # file that broke since then is ledgered instead of keeping its stale vector.
    staging.add(
        [], [], [{"path": p, "label": "", "bytes": 0, "mtime": 0.0, "reason": r} for p, r in problems]
    )

    batch_size = config.batch_size or default_batch_size(runtime)
    workers = default_workers(runtime) if config.workers is None else config.workers
    embedded = 0
    if todo:
        progress.start(len(entries), reused, f"embedding with {backbone.spec.name}")

        # No autograd switch here: `forward` runs under inference_mode, and a global switch leaked to
        # the caller (training after indexing in one process broke).
        handed: dict[int, int] = {}  # batch start -> files embedded; a repeat is counted once

        def consume(batch: Batch) -> None:
            with timer.stage("map"):
                vectors = forward(model, runtime, transform, batch.images, config.tta) if batch.rows else []
                finite = np.isfinite(vectors).all(axis=1) if len(vectors) else None
                if finite is not None and not finite.all():
                    # FAISS would index them and then never return them: stop with the cause.
                    bad = batch.rows[int(np.argmin(finite))]["path"]
                    raise RetrieveError(
                        f"The backbone gives NaN or infinite features (first for {bad}); nothing "
                        "from this run is committed. Check the weights, or try --dtype float32."
                    )
            with timer.stage("write"):
                staging.add(vectors, batch.rows, batch.skipped)
            if batch.start not in handed:  # decode_all hands a batch over again after a crash
                handed[batch.start] = len(batch.rows)
                progress.advance(batch.count)

        try:
            decode_all(
                todo,
                transform,
                batch_size,
                workers,
                consume,
                wrap=lambda stream: timer.timed("read", stream),
                warn=progress.warn,
                decoder=PILDecoder() if decoder is None else decoder,
                policy=IsolationPolicy() if policy is None else policy,
            )
        finally:
            # Whatever happens (Ctrl-C included), what was embedded so far is kept for the re-run.
            staging.flush()
            progress.stop()
        embedded = sum(handed.values())

    with timer.stage("commit"):
        manifest = commit(
            index_dir,
            staging,
            [e.relpath for e in entries] + [p for p, _ in problems],
            manifest,
            config.shard_rows,
        )
    from retrieval.store import generation_dir, read_jsonl

    ledger = read_jsonl(generation_dir(index_dir, manifest) / "skipped.jsonl")
    reasons: dict[str, int] = {}
    for row in ledger:
        reasons[_reason_kind(row["reason"])] = reasons.get(_reason_kind(row["reason"]), 0) + 1
    return IndexReport(
        index=index_dir,
        indexed=manifest.counts.indexed,
        embedded=embedded,
        skipped=manifest.counts.skipped,
        seconds=time.perf_counter() - t0,
        device=device,
        backbone=backbone.spec.name,
        dim=backbone.dim,
        stages=dict(timer.seconds),
        skipped_reasons=reasons,
    )
