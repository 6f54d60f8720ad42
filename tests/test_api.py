"""The Python API: indexed files queried from disk find themselves; weights are checked by hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.index_folder import build_index
from retrieval import open_index
from retrieval.config import IndexConfig
from retrieval.errors import RetrieveError
from retrieval.samples import SampleConfig, make_samples


@pytest.mark.parametrize(("backbone", "metric"), [("resnet18", "l2"), ("lenet", "cosine"), ("pixels", "l2")])
def test_indexed_files_queried_from_disk_find_themselves(
    tmp_path: Path, samples: Path, backbone: str, metric: str
) -> None:
    cfg = IndexConfig(
        images=samples / "test",
        index=tmp_path / "i",
        backbone=backbone,
        weights="none" if backbone != "pixels" else None,
        metric=metric,
        workers=1,
    )
    build_index(cfg)
    idx = open_index(tmp_path / "i")
    files = [idx.root / p for p in idx.paths[::5]]
    results = idx.search_paths(files, k=2)
    for f, hits in zip(files, results, strict=True):
        assert hits[0].path == f.relative_to(idx.root).as_posix()
        scale = 1.0 if metric == "cosine" else float(np.linalg.norm(idx.vectors()[hits[0].id]))
        assert hits[0].distance <= 2e-2 * max(scale, 1.0), (backbone, hits[0].distance)
    # search by array equals search by id (with self) and by path
    v = np.asarray(idx.vectors()[[3]])
    assert [h.id for h in idx.search(v, k=3)[0]] == [
        h.id for h in idx.search_ids([3], k=3, exclude_self=False)[0]
    ]
    assert idx.id_of(idx.root / idx.paths[3]) == 3 and idx.id_of(idx.paths[3]) == 3


def test_changed_weights_are_refused(tmp_path: Path, samples: Path) -> None:
    build_index(IndexConfig(images=samples / "test", index=tmp_path / "i", backbone="lenet", workers=0))
    manifest_path = tmp_path / "i" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["weights"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(RetrieveError, match="differ from those the index was built with"):
        open_index(tmp_path / "i").search_paths([samples / "test" / "star" / "0000.png"])


def test_damaged_index_is_a_clear_error(tmp_path: Path, samples: Path) -> None:
    build_index(IndexConfig(images=samples / "test", index=tmp_path / "i", backbone="pixels", workers=0))
    idx = open_index(tmp_path / "i")
    (idx.dir / "metadata.parquet").unlink()
    with pytest.raises(RetrieveError, match="damaged"):
        open_index(tmp_path / "i")


def test_indexing_leaves_autograd_as_it_found_it(tmp_path: Path) -> None:
    """A library call must not switch gradients off for the caller (training after indexing)."""
    import torch

    make_samples(tmp_path / "s", SampleConfig(per_class=2, test_per_class=0, size=32))
    assert torch.is_grad_enabled()
    build_index(IndexConfig(images=tmp_path / "s", index=tmp_path / "idx", backbone="pixels"))
    assert torch.is_grad_enabled()


def test_manifest_names_its_search_index_and_unknown_kinds_are_refused(tmp_path: Path) -> None:
    """The seam for approximate indexes: a kind this version cannot read is a clear error."""
    from retrieval.errors import IndexFormatError

    make_samples(tmp_path / "s", SampleConfig(per_class=2, test_per_class=0, size=32))
    build_index(IndexConfig(images=tmp_path / "s", index=tmp_path / "idx", backbone="pixels"))
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    record = manifest["search_index"]
    assert {k: record[k] for k in ("type", "faiss")} == {"type": "exact", "faiss": "IndexFlatL2"}
    # What `info` shows: exact search measures recall 1, its latency and its size on disk.
    assert record["recall_at_10"] == 1.0 and 0 < record["p50_ms"] <= record["p95_ms"]
    size = (tmp_path / "idx" / manifest["generation"] / "index.faiss").stat().st_size
    assert record["bytes_per_vector"] == round(size / manifest["counts"]["indexed"], 1)
    assert open_index(tmp_path / "idx").search_ids([0], k=1, exclude_self=False)[0][0].id == 0
    manifest["search_index"] = {"type": "ivf-pq", "faiss": "IndexIVFPQ"}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="ivf-pq"):
        open_index(tmp_path / "idx").search_ids([0], k=1)


def test_tta_index_embeds_the_mean_of_image_and_mirror_and_queries_the_same_way(
    tmp_path: Path, samples: Path
) -> None:
    from PIL import Image

    src = samples / "test" / "star"
    mirrored = tmp_path / "mirrored" / "star"
    mirrored.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / f.name)

    def index(images: Path, name: str, tta: bool) -> np.ndarray:
        cfg = IndexConfig(
            images=images,
            index=tmp_path / name,
            backbone="resnet18",
            weights="none",
            tta=tta,
            dtype="float32",
        )
        build_index(cfg)
        idx = open_index(tmp_path / name)
        order = np.argsort(idx.paths)  # both folders hold the same file names
        return np.asarray(idx.vectors())[order]

    plain, flipped = index(src, "plain", False), index(mirrored, "flipped", False)
    tta, tta_flipped = index(src, "tta", True), index(mirrored, "tta-flipped", True)
    assert not np.allclose(plain, flipped, atol=1e-3)  # a random net is far from mirror-invariant
    # Oracle: the mean of the two plain embeddings; and an image and its mirror now embed alike.
    np.testing.assert_allclose(tta, (plain + flipped) / 2, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(tta, tta_flipped, rtol=1e-3, atol=1e-4)
    idx = open_index(tmp_path / "tta")
    assert idx.manifest.tta is True
    # Queries from disk go through the same mirror averaging: each file finds itself at distance ~0.
    files = [idx.root / p for p in idx.paths[:4]]
    gap = float(((plain - tta) ** 2).sum(1).min())  # how far off a query embedded without it would be
    for f, hits in zip(files, idx.search_paths(files, k=1, device="cpu"), strict=True):
        assert hits[0].path == f.name and hits[0].distance < 1e-3 * gap
