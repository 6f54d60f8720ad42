"""Frozen configuration dataclasses: CLI flags map onto these fields, unknown keys raise."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from retrieval.errors import RetrieveError


@dataclass(frozen=True)
class SearchConfig:
    """How `retrieve index` picks its search index (see retrieval.index.choose)."""

    # "auto": exact below 100k vectors, else the measured choice; "approximate": the measured
    # choice at any size; "exact": flat search; or a FAISS factory string, measured as it is.
    search: str = "auto"
    max_memory: int | None = None  # bytes the search index may hold in RAM; None = half of RAM
    min_recall: float = 0.95  # recall@10 against exact search that the choice must measure
    max_latency_ms: float = 10.0  # p50 of one query that an operating point must keep under
    queries: int = 1000  # held-out rows the recall is measured on
    seed: int = 0  # for the query rows and the training sample

    def __post_init__(self) -> None:
        if not 0.0 < self.min_recall <= 1.0:
            raise RetrieveError(f"«min_recall» must be in (0, 1] (got {self.min_recall}).")
        if self.max_memory is not None and self.max_memory <= 0:
            raise RetrieveError(f"«max_memory» must be above 0 (got {self.max_memory}).")
        if not self.search.strip():
            raise RetrieveError("«search» is empty: give auto, exact or a FAISS factory string.")
        if self.queries < 1:
            raise RetrieveError("«queries» must be at least 1")


@dataclass(frozen=True)
class IndexConfig:
    """Settings of `retrieve index` / `build_index`."""

    images: Path  # folder scanned recursively
    index: Path  # index directory (created; an existing one is synced, atomically, on success)
    backbone: str | None = None  # registry name; None = efficientnet_lite0, or the checkpoint's architecture
    weights: str | None = None  # "imagenet", "none", or a checkpoint path; None = the backbone's default
    layer: str | None = None  # FX node to tap instead of the registry default
    metric: str = "l2"  # "l2" (Euclidean) or "cosine"
    tta: bool = False  # embed each image as the mean of its and its mirror's features (2x the compute)
    device: str = "auto"  # auto = CUDA > MPS > CPU
    dtype: str = "auto"  # autocast dtype; auto = bf16 where the hardware does it natively
    batch_size: int | None = None  # None = 256 on GPU, 32 on CPU
    workers: int | None = None  # DataLoader processes; None = chosen for the device
    shard_rows: int = 4096  # vectors per shard on disk: the unit of resumable progress
    flush_seconds: float = 30.0  # ...and a shard at least this often, so a kill loses at most this much
    engine: str = "local"  # where the pipeline runs; "local" (Ray is a later engine)
    search: SearchConfig = SearchConfig()  # which search index is built over the vectors
    # An existing index is synced (only added and changed files are embedded); True embeds every
    # file again and replaces it, whatever settings made it.
    rebuild: bool = False
    verify: bool = False  # a sync also hashes files whose size and times agree (slower: reads them)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexConfig:
        return cls(**known_keys(cls, d))

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise RetrieveError("batch size must be at least 1")
        if self.shard_rows < 1:
            raise RetrieveError("shard rows must be at least 1")
        if not self.flush_seconds > 0:
            raise RetrieveError(f"«flush_seconds» must be above 0 (got {self.flush_seconds}).")
        if self.workers is not None and self.workers < 0:
            raise RetrieveError("workers must be 0 or more")


def known_keys(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """`d` unchanged when every key is a field of the dataclass `cls`; else one clear error."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RetrieveError(f"Unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    return d
