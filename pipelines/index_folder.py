"""The index job: scan a folder, decode in loader workers, embed on the device, write resumable shards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.runner import ENGINES as RUNNER_ENGINES
from pipelines.runner import Settings, StageTimer, run
from retrieval.config import IndexConfig
from retrieval.errors import EmptyInputError, NoSpaceError, RetrieveError
from retrieval.paths import user_path
from retrieval.progress import Progress
from retrieval.store.space import build_bytes, check_room, free_bytes, is_no_space, no_space
from retrieval.store.sync import built_with

if TYPE_CHECKING:
    from retrieval.backbones import Backbone
    from retrieval.device import Runtime
    from retrieval.images import Batch, Decoder, ImageFileEntry, IsolationPolicy, Transform
    from retrieval.store import Manifest, Staging
    from retrieval.store.sync import Base, SyncPlan

ENGINES = tuple(RUNNER_ENGINES)
__all__ = ["ENGINES", "EmbedMapper", "IndexReport", "Progress", "ShardWriter", "build_index"]


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
    sync: dict[str, int] | None = None  # added, changed, removed, renamed, unchanged: a run over an index

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


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
            f"{index_dir} is a folder with other files in it, not an index; give «index» a new or empty "
            "folder (an index writes and replaces files of its own there)."
        )
    progress = progress or Progress()
    with writer_lock(index_dir, warn=progress.warn):
        return _build_index(config, root, index_dir, progress, decoder, policy)


def plan_index(config: IndexConfig, progress: Progress | None = None) -> SyncPlan | None:
    """What a sync of `config.images` into `config.index` would add, change and remove (None: there
    is no index yet). Loads the model only to check that the settings match; writes nothing."""
    progress = progress or Progress()
    root, index_dir = user_path(config.images).absolute(), user_path(config.index).absolute()
    mapper = EmbedMapper.load(config)
    entries, problems = _scan(root)
    return _sync_base(config, index_dir, _manifest(config, root, mapper), entries, problems, progress)[1]


@contextmanager
def _disk_guard(index_dir: Path, needed: int) -> Iterator[None]:
    """A full disk while writing becomes one error that says what happened and what is safe."""
    try:
        yield
    except OSError as exc:
        if not is_no_space(exc):
            raise
        raise no_space(index_dir, needed, free_bytes(index_dir), _live(index_dir), before=False) from exc


def _live(index_dir: Path) -> str | None:
    """The committed generation of the index at `index_dir`, if there is one."""
    from retrieval.store import read_manifest

    try:
        return read_manifest(index_dir).generation
    except (RetrieveError, OSError):
        return None


class EmbedMapper:
    """Decode + embed, built once per worker: the model on its device, the transform, the decoder."""

    def __init__(
        self, backbone: Backbone, runtime: Runtime, tta: bool, decoder: Decoder | None = None
    ) -> None:
        from retrieval.embed import prepare_model
        from retrieval.images import PILDecoder, Transform

        self.backbone = prepare_model(backbone, runtime)
        self.runtime = runtime
        self.tta = tta
        self.transform: Transform = Transform(backbone.preprocess)
        self.decoder: Decoder = PILDecoder() if decoder is None else decoder

    @classmethod
    def load(cls, config: IndexConfig, decoder: Decoder | None = None) -> EmbedMapper:
        from retrieval.backbones import load_backbone
        from retrieval.device import resolve_runtime

        runtime = resolve_runtime(config.device, config.dtype)
        return cls(load_backbone(config.backbone, config.weights, config.layer), runtime, config.tta, decoder)

    def __call__(self, batch: Batch) -> np.ndarray:
        from retrieval.embed import forward

        # No autograd switch here: `forward` runs under inference_mode, and a global switch leaked to
        # the caller (training after indexing in one process broke).
        vectors = forward(self.backbone, self.runtime, self.transform, batch.images, self.tta)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            # FAISS would index them and then never return them: stop with the cause.
            bad = batch.rows[int(np.argmin(finite))]["path"]
            raise RetrieveError(
                f"The backbone gives NaN or infinite features (first for {bad}); nothing "
                "from this run is committed. Check the weights, or try «dtype» float32."
            )
        return vectors

    def describe(self) -> str:
        # The pixel baseline is a resize and a flatten: no network, so no autocast or memory format.
        return self.runtime.describe() if self.backbone.spec.builder else self.runtime.device.type


class ShardWriter:
    """Appends each batch to the staging shards: one append per batch, so a repeat is harmless."""

    def __init__(self, staging: Staging) -> None:
        self.staging = staging

    def write(self, batch: Batch, vectors: np.ndarray) -> None:
        self.staging.add(vectors if batch.rows else [], batch.rows, batch.skipped)

    def close(self) -> None:
        self.staging.flush()


def _manifest(config: IndexConfig, root: Path, mapper: EmbedMapper) -> Manifest:
    from retrieval import __version__
    from retrieval.store import Manifest, WeightsRecord

    backbone, runtime = mapper.backbone, mapper.runtime
    return Manifest(
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


def _announce(mapper: EmbedMapper, progress: Progress) -> None:
    backbone = mapper.backbone
    progress.note(f"device: {mapper.describe()}")
    if backbone.weights.kind == "pixels":  # no network: the resize is the whole "backbone"
        size = backbone.preprocess.size
        progress.note(f"backbone: pixels (raw RGB at {size}x{size} px) {backbone.dim}-d")
    else:
        progress.note(
            f"backbone: {backbone.spec.name} (layer {backbone.layer}) {backbone.dim}-d, "
            f"weights {backbone.weights.id}"
        )
    if backbone.weights.kind == "none":
        progress.warn(
            "weights: none: RANDOM initialisation (seed 0); neighbours will be close "
            "to meaningless. Use «weights» imagenet or a trained checkpoint for real retrieval."
        )


def _scan(root: Path) -> tuple[list[ImageFileEntry], list[tuple[str, str]]]:
    from retrieval.images import IMAGE_EXTENSIONS, scan

    entries, problems = scan(root)
    if not entries and not problems:
        raise EmptyInputError(
            f"No images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)."
        )
    return entries, problems


def _to_do(
    staging: Staging,
    entries: list[ImageFileEntry],
    problems: list[tuple[str, str]],
    progress: Progress,
    base: Base | None = None,
    plan: SyncPlan | None = None,
) -> list[ImageFileEntry]:
    """The files neither the staging area nor the committed generation (a sync's `base`) has handled
    as they are now; the scan's problems are staged."""
    staged = staging.open()
    carried: dict = {}
    if base is not None and plan is not None:
        from retrieval.store.sync import carried_over

        carried = carried_over(staging, base, plan, entries)
    done = {**carried, **staged}  # a staged entry is newer than the generation's

    def handled(e: ImageFileEntry, done: dict) -> bool:
        return (d := done.get(e.relpath)) is not None and d.matches(e)

    todo = [e for e in entries if not handled(e, done)]
    reused = sum(handled(e, staged) for e in entries) if staged else 0
    if reused:
        progress.note(f"resuming: {reused} files already handled by an interrupted run")
    # Staged every run, even for paths an earlier run embedded: the later shard wins at commit, so a
    # file that broke since then is ledgered instead of keeping its stale vector.
    staging.add(
        [], [], [{"path": p, "label": "", "bytes": 0, "mtime": 0.0, "reason": r} for p, r in problems]
    )
    return todo


def _build_index(
    config: IndexConfig,
    root: Path,
    index_dir: Path,
    progress: Progress,
    decoder: Decoder | None = None,
    policy: IsolationPolicy | None = None,
) -> IndexReport:
    from retrieval.embed import default_batch_size, default_workers
    from retrieval.store import Staging, commit

    t0 = time.perf_counter()
    timer = StageTimer()
    with timer.stage("load model"):
        mapper = EmbedMapper.load(config, decoder)
        _announce(mapper, progress)
    # Scanned after the model loads: a bad --backbone/--weights fails before a long scan.
    with timer.stage("scan"):
        entries, problems = _scan(root)
    manifest = _manifest(config, root, mapper)
    base, plan = _sync_base(config, index_dir, manifest, entries, problems, progress)
    # Staged shards are reused only by a run that would compute the same vectors.
    staging = Staging(index_dir, manifest.run_key(), config.shard_rows, config.flush_seconds)
    # Nothing to do only when no interrupted run waits and the search index asked for is the same.
    same_search = base is not None and built_with(base.manifest.search_index, config.search)
    if plan is not None and plan.nothing_to_do and same_search and not staging.dir.exists():
        progress.note("up to date: nothing added, changed or removed (no image read, no new generation)")
        return _report(index_dir, base.manifest, 0, t0, mapper, timer, plan)
    todo = _to_do(staging, entries, problems, progress, base, plan)
    needed = build_bytes(mapper.backbone.dim, len(todo), len(entries))
    try:
        check_room(index_dir, needed, _live(index_dir))
    except NoSpaceError:
        # Refused before any work: a staging area holding nothing yet is not left behind.
        staging.drop_if_empty()
        raise
    runtime = mapper.runtime
    settings = Settings(
        batch_size=config.batch_size or default_batch_size(runtime),
        workers=default_workers(runtime) if config.workers is None else config.workers,
        policy=policy,
    )
    embedded = 0
    with _disk_guard(index_dir, needed):
        if todo:
            what = f"embedding with {mapper.backbone.spec.name}"
            progress.start(len(entries), len(entries) - len(todo), what)
            embedded = run(
                todo,
                lambda: mapper,
                ShardWriter(staging),
                settings,
                engine=config.engine,
                progress=progress,
                timer=timer,
            )
        with timer.stage("commit"):
            order = [e.relpath for e in entries] + [p for p, _ in problems]
            manifest = commit(
                index_dir,
                staging,
                order,
                manifest,
                config.shard_rows,
                config.search,
                progress,
                base,
                plan.counts() if plan else None,
            )
    return _report(index_dir, manifest, embedded, t0, mapper, timer, plan)


def _sync_base(
    config: IndexConfig,
    index_dir: Path,
    manifest: Manifest,
    entries: list[ImageFileEntry],
    problems: list[tuple[str, str]],
    progress: Progress,
) -> tuple[Base | None, SyncPlan | None]:
    """The live generation a run syncs from (None: a first run, or «rebuild») and what changed."""
    from retrieval.store.sync import committed_base, plan_sync

    base = None if config.rebuild else committed_base(index_dir, manifest.run_key())
    if base is None:
        return None, None
    plan = plan_sync(entries, problems, base, config.verify)
    counts = ", ".join(f"{n:,} {what}" for what, n in plan.counts().items())
    progress.note(f"syncing with {base.manifest.generation}: {counts}")
    return base, plan


def _report(
    index_dir: Path,
    manifest: Manifest,
    embedded: int,
    t0: float,
    mapper: EmbedMapper,
    timer: StageTimer,
    plan: SyncPlan | None,
) -> IndexReport:
    return IndexReport(
        index=index_dir,
        indexed=manifest.counts.indexed,
        embedded=embedded,
        skipped=manifest.counts.skipped,
        seconds=time.perf_counter() - t0,
        device=mapper.describe(),
        backbone=mapper.backbone.spec.name,
        dim=mapper.backbone.dim,
        stages=dict(timer.seconds),
        skipped_reasons=_ledger_reasons(index_dir, manifest),
        sync=plan.counts() if plan else None,
    )


def _ledger_reasons(index_dir: Path, manifest: Manifest) -> dict[str, int]:
    from retrieval.store import generation_dir, read_jsonl

    reasons: dict[str, int] = {}
    for row in read_jsonl(generation_dir(index_dir, manifest) / "skipped.jsonl"):
        reasons[_reason_kind(row["reason"])] = reasons.get(_reason_kind(row["reason"]), 0) + 1
    return reasons
