"""Frozen configuration dataclasses: CLI flags map onto these fields, unknown keys raise."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from retrieval.errors import RetrieveError


@dataclass(frozen=True)
class IndexConfig:
    """Settings of `retrieve index` / `build_index`."""

    images: Path  # folder scanned recursively
    index: Path  # index directory (created; an existing index is replaced atomically on success)
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
