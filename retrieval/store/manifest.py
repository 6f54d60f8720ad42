"""The manifest: one frozen, typed record of an index directory, read and written here only.

`manifest.json` is the on-disk contract (and the commit point). Every reader gets a `Manifest`;
`from_dict` checks what a hand-edited or truncated file could get wrong and reads every format
version written so far (fields added since version 1 have defaults that mean what older runs did).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from retrieval.errors import IndexFormatError, RetrieveError
from retrieval.preprocess import Preprocess

FORMAT = "retrieve-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GENERATION = re.compile(r"gen-\d{6,}")
VECTOR_FILE = re.compile(r"vectors-\d{5,}\.npy")
# The staging area's own version: 2 added ctime to the shard metadata.
STAGING_LAYOUT = 2
HISTORY = 100  # commits remembered in the manifest


@dataclass(frozen=True)
class WeightsRecord:
    """Which weights made the vectors: a query must be embedded by the same ones (checked by hash)."""

    kind: str  # pixels, none, imagenet, checkpoint, or precomputed (`index --vectors`: no network)
    id: str  # torchvision weights name, checkpoint file name, or random-init(seed=0)
    sha256: str  # of the state dict ("" for pixels)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "sha256": self.sha256}

    def words(self, full: bool = False) -> str:
        """The weights for people, one wording everywhere: "raw pixels", "random weights",
        "ImageNet" or the checkpoint's file name; `full` adds torchvision's name or the whole path."""
        if self.kind in ("pixels", "none", "precomputed"):
            return {"pixels": "raw pixels", "none": "random weights", "precomputed": "precomputed vectors"}[
                self.kind
            ]
        if self.kind == "imagenet":
            return f"ImageNet ({self.id})" if full and self.id else "ImageNet"
        return self.id if full else PurePath(self.id).name


@dataclass(frozen=True)
class Counts:
    indexed: int  # vectors in the generation
    skipped: int = 0  # rows of its ledger
    # The next unused id: ids are stable across syncs and never reused (0: a manifest from before,
    # whose ids were its rows 0..indexed-1).
    next_id: int = 0


@dataclass(frozen=True)
class Manifest:
    """An index directory: what made its vectors, how to search them, and the live generation."""

    root: str  # the indexed folder (absolute); metadata paths are relative to it
    backbone: str
    layer: str | None  # the tapped node ("" for pixels)
    weights: WeightsRecord
    preprocess: Preprocess  # exactly how a query image becomes the network's input
    dim: int
    metric: str  # l2 or cosine
    checkpoint: str | None = None  # absolute path of the checkpoint, for weights of kind checkpoint
    tta: bool = False  # mirror-averaged embeddings (absent before tta existed: one view)
    dtype: str = "auto"  # autocast dtype used at index time (absent in the first manifests)
    retrieve_version: str = ""
    # Set by commit: the live generation and what it holds.
    generation: str = ""
    vector_files: tuple[str, ...] = ()
    counts: Counts = Counts(0)
    # What index.faiss is, for `index.load_index` (exact search before the field existed).
    search_index: dict[str, Any] = field(default_factory=lambda: {"type": "exact"})
    committed: str = ""
    format_version: int = FORMAT_VERSION
    # One entry per commit, the latest last (at most HISTORY): generation, committed, indexed,
    # skipped, and for a sync its added, changed, removed and renamed counts.
    history: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, keys in the order `retrieve info --json` has always printed them."""
        d: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "retrieve_version": self.retrieve_version,
            "root": self.root,
            "backbone": self.backbone,
            "layer": self.layer,
            "weights": self.weights.to_dict(),
            "checkpoint": self.checkpoint,
            "preprocess": self.preprocess.to_dict(),
            "dim": self.dim,
            "metric": self.metric,
            "tta": self.tta,
            "dtype": self.dtype,
        }
        if self.generation:
            d |= {
                "generation": self.generation,
                "vector_files": list(self.vector_files),
                "counts": {
                    "indexed": self.counts.indexed,
                    "skipped": self.counts.skipped,
                    "next_id": self.counts.next_id,
                },
                "search_index": dict(self.search_index),
                "committed": self.committed,
                "history": [dict(h) for h in self.history],
            }
        return d

    def committed_as(
        self,
        generation: str,
        vector_files: list[str],
        counts: Counts,
        search_index: dict[str, Any],
        when: str,
        changes: dict[str, int] | None = None,
    ) -> Manifest:
        """This manifest naming a new generation; `changes` (a sync's counts) go into its history."""
        entry = {
            "generation": generation,
            "committed": when,
            "indexed": counts.indexed,
            "skipped": counts.skipped,
        }
        return dataclasses.replace(
            self,
            generation=generation,
            vector_files=tuple(vector_files),
            counts=counts,
            search_index=dict(search_index),
            committed=when,
            history=(*self.history, entry | (changes or {}))[-HISTORY:],
        )

    def run_key(self) -> dict[str, Any]:
        """What staged shards must share to be reused: everything that changes the vectors."""
        d = self.to_dict()
        keep = ("root", "backbone", "layer", "weights", "preprocess", "dim", "tta", "dtype")
        return {"layout": STAGING_LAYOUT, **{k: d[k] for k in keep}}

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json", folder: str | None = None) -> Manifest:
        """Check and read a manifest's JSON; `where` names the file in errors, `folder` its index."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise IndexFormatError(f"{where} is not a retrieve index manifest.")
        version = d.get("format_version", 0)
        if not isinstance(version, int):
            raise IndexFormatError(f"{where} is damaged: format_version is {version!r}, not a number.")
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"{folder or where} was written by a newer retrieve (format {version}); upgrade."
            )
        _check_fields(where, d)
        try:
            weights = WeightsRecord(**{k: str(d["weights"][k]) for k in ("kind", "id", "sha256")})
            preprocess = Preprocess.from_dict(d["preprocess"])
        except (KeyError, TypeError, RetrieveError) as exc:
            raise IndexFormatError(f"{where} is damaged: malformed weights or preprocess ({exc}).") from None
        counts = d["counts"]
        return cls(
            root=d["root"],
            backbone=d["backbone"],
            layer=d.get("layer"),
            weights=weights,
            preprocess=preprocess,
            dim=d["dim"],
            metric=d["metric"],
            checkpoint=d.get("checkpoint"),
            tta=bool(d.get("tta", False)),
            dtype=d.get("dtype") or "auto",
            retrieve_version=d.get("retrieve_version", ""),
            generation=d["generation"],
            vector_files=tuple(d["vector_files"]),
            counts=Counts(
                counts["indexed"],
                int(counts.get("skipped", 0)),
                int(counts.get("next_id", counts["indexed"])),
            ),
            search_index=dict(d.get("search_index") or {"type": "exact"}),
            committed=d.get("committed", ""),
            format_version=version,
            history=tuple(dict(h) for h in d.get("history") or () if isinstance(h, dict)),
        )


# What readers rely on, with the type each must have. A hand-edited or truncated manifest fails
# here with one message instead of a KeyError deep inside a command.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "root": str,
    "backbone": str,
    "weights": dict,
    "preprocess": dict,
    "dim": int,
    "metric": str,
    "generation": str,
    "vector_files": list,
    "counts": dict,
}


def _check_fields(where: str, manifest: dict[str, Any]) -> None:
    wrong = [k for k, t in _FIELDS.items() if not isinstance(manifest.get(k), t)]
    if "counts" not in wrong and not isinstance(manifest["counts"].get("indexed"), int):
        wrong.append("counts")
    if wrong:
        raise IndexFormatError(f"{where} is damaged: missing or malformed {', '.join(wrong)}.")
    # Names inside the index folder only: a manifest must not lead readers anywhere else.
    files = manifest["vector_files"]
    if not GENERATION.fullmatch(manifest["generation"]) or not all(
        isinstance(f, str) and VECTOR_FILE.fullmatch(f) for f in files
    ):
        raise IndexFormatError(f"{where} is damaged: it names files outside the index's own layout.")
