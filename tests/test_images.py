"""Scanning and decoding: every PIL mode to RGB, EXIF, symlinks, and a corpus of broken files."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.index_folder import build_index
from retrieval.api import open_index
from retrieval.config import IndexConfig
from retrieval.errors import BadImageError, EmptyInputError
from retrieval.images import Transform, open_image, scan
from retrieval.preprocess import Preprocess


def _rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def make_corpus(root: Path) -> dict[str, str | None]:
    """Write good and bad files; returns relpath -> expected ledger reason fragment (None = indexed)."""
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    expect: dict[str, str | None] = {}
    base = _rgb(0)
    modes = {
        "rgb.jpg": base,
        "grey.png": base.convert("L"),
        "greyalpha.png": base.convert("LA"),
        "rgba.png": base.convert("RGBA"),
        "cmyk.jpg": base.convert("CMYK"),
        "anim.gif": base.convert("P"),
        "photo.webp": base,
        "bitmap.bmp": base,
        "scan.tif": base,
    }
    for name, img in modes.items():
        img.save(good / name)
        expect[f"good/{name}"] = None
    # P with transparency
    p = base.convert("P")
    p.info["transparency"] = 0
    p.save(good / "ptrans.png", transparency=0)
    expect["good/ptrans.png"] = None
    # 16-bit greyscale
    arr16 = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    Image.fromarray(arr16).save(good / "deep.png")
    expect["good/deep.png"] = None
    # Upper-case extension and a nested folder
    (good / "nested").mkdir()
    base.save(good / "nested" / "UPPER.JPG")
    expect["good/nested/UPPER.JPG"] = None
    # Bad files
    (bad / "empty.jpg").write_bytes(b"")
    expect["bad/empty.jpg"] = "empty file"
    buf = io.BytesIO()
    _rgb(1, (200, 200)).save(buf, format="JPEG")
    (bad / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["bad/truncated.jpg"] = "truncated"
    (bad / "notes.png").write_text("this is not an image\n" * 10)
    expect["bad/notes.png"] = "not an image"
    # A decompression bomb: a tiny file that claims ~90 Mpx.
    Image.new("1", (10_000, 9_000)).save(bad / "bomb.png", optimize=True)
    expect["bad/bomb.png"] = "decompression bomb"
    os.symlink(root / "does-not-exist.jpg", bad / "dangling.jpg")
    expect["bad/dangling.jpg"] = "cannot stat"
    # Symlinks: a file link (indexed) and a loop back to the root (not followed twice).
    os.symlink(good / "rgb.jpg", root / "link.jpg")
    expect["link.jpg"] = None
    os.symlink(root, good / "loop")
    # Non-image files are ignored silently.
    (good / "readme.txt").write_text("hi")
    return expect


def test_corpus_indexes_good_files_and_ledgers_bad_ones(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    expect = make_corpus(root)
    report = build_index(
        IndexConfig(images=root, index=tmp_path / "idx", backbone="pixels", workers=0, batch_size=4)
    )
    idx = open_index(tmp_path / "idx")
    indexed = set(idx.paths)
    assert indexed == {p for p, why in expect.items() if why is None}
    ledger = {r["path"]: r["reason"] for r in idx.skipped()}
    assert set(ledger) == {p for p, why in expect.items() if why is not None}
    for path, why in expect.items():
        if why is not None:
            assert why in ledger[path], (path, ledger[path])
    assert report.skipped == len(ledger) and report.indexed == len(indexed)
    # Metadata is complete and readable with pandas.
    import pandas as pd

    df = pd.read_parquet(idx.dir / "metadata.parquet")
    assert list(df.columns) == [
        *("id", "path", "label", "width", "height", "bytes", "mtime", "ctime", "inode", "mtime_ns", "hash")
    ]
    st = (idx.root / "good" / "rgb.jpg").stat()
    assert df.loc[df.path == "good/rgb.jpg", ["inode", "mtime_ns"]].values.tolist() == [
        [st.st_ino, st.st_mtime_ns]
    ]
    import hashlib  # the content hash a sync knows a moved file by: blake2b-128 of its bytes

    rgb = (idx.root / "good" / "rgb.jpg").read_bytes()
    assert (
        df.loc[df.path == "good/rgb.jpg", "hash"].item() == hashlib.blake2b(rgb, digest_size=16).hexdigest()
    )
    assert (df.loc[df.path == "good/rgb.jpg", ["width", "height"]].values == [[40, 30]]).all()
    assert df.loc[df.path == "good/nested/UPPER.JPG", "label"].item() == "nested"
    assert df.loc[df.path == "link.jpg", "label"].item() == "corpus"
    assert list(df.id) == list(range(len(df)))


def test_scan_is_sorted_and_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for name in ["b/2.png", "a/10.png", "a/9.png", "c.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _rgb(1).save(root / name)
    a, _ = scan(root)
    b, _ = scan(root)
    assert [e.relpath for e in a] == [e.relpath for e in b] == ["c.png", "a/10.png", "a/9.png", "b/2.png"]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 40000, np.uint16))
    else:
        img = _rgb(2).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I", "F") else "x.png")
    img.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == img.size


def test_transparency_composites_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.save(tmp_path / "clear.png")
    assert open_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = _rgb(3, (60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (20, 60)


def test_transform_shapes_and_draft_consistency(tmp_path: Path) -> None:
    _rgb(4, (900, 700)).save(tmp_path / "big.jpg")
    pre = Preprocess(size=64, resize=72)
    t = Transform(pre)
    x = t(open_image(tmp_path / "big.jpg", draft=t.draft_size))
    assert x.shape == (3, 64, 64) and x.dtype.name == "float32" if hasattr(x.dtype, "name") else True
    grey = Transform(Preprocess(size=32, resize=32, squash=True, mean=(0.5,) * 3, std=(0.5,) * 3, channels=1))
    assert grey(open_image(tmp_path / "big.jpg")).shape == (1, 32, 32)


def test_bad_query_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty"):
        open_image(tmp_path / "x.jpg")


def test_empty_folder_and_all_bad(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError, match="No images"):
        build_index(
            IndexConfig(images=tmp_path / "empty", index=tmp_path / "i", backbone="pixels", workers=0)
        )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    with pytest.raises(EmptyInputError, match="None of the 1"):
        build_index(IndexConfig(images=tmp_path / "bad", index=tmp_path / "i", backbone="pixels", workers=0))
    assert not (tmp_path / "i" / "manifest.json").exists()


def test_an_index_inside_the_folder_is_not_scanned(tmp_path: Path, samples: Path) -> None:
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(samples / "test" / "star", root / "star")
    cfg = IndexConfig(images=root, index=root / "indexes" / "px", backbone="pixels", workers=0)
    build_index(cfg)
    # Outputs written into the index (e.g. a map's PNG) must not be indexed by the next run.
    _rgb(5).save(root / "indexes" / "px" / "grid.png")
    report = build_index(cfg)
    assert report.indexed == 3 and all(
        p.startswith("star/") for p in open_index(root / "indexes" / "px").paths
    )


def _crop(img: Image.Image, side: int) -> Image.Image:
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def test_upscale_enlarges_small_images_only_to_the_input_size_and_keeps_larger_ones_as_before() -> None:
    """With `upscale`, a source smaller than the resize target is enlarged with that interpolation
    to the input size (no crop margin thrown away); a large photo is resized exactly as without it;
    without `upscale` (every index made before the field) nothing changes."""
    old = Preprocess(size=224, resize=256, interpolation="bicubic")
    new = dataclasses.replace(old, upscale="bilinear")
    small = _rgb(1, (32, 40))
    enlarged = small.resize((224, 280), Image.Resampling.BILINEAR, reducing_gap=3.0)
    assert np.array_equal(np.asarray(Transform(new).resize_crop(small)), np.asarray(_crop(enlarged, 224)))
    as_before = small.resize((256, 320), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert np.array_equal(np.asarray(Transform(old).resize_crop(small)), np.asarray(_crop(as_before, 224)))
    between = _rgb(2, (240, 300))  # above the input, below the resize target: cropped, not resized
    assert np.array_equal(np.asarray(Transform(new).resize_crop(between)), np.asarray(_crop(between, 224)))
    large = _rgb(3, (400, 300))
    assert np.array_equal(
        np.asarray(Transform(new).resize_crop(large)), np.asarray(Transform(old).resize_crop(large))
    )
    # A manifest written before the field reads back as the old behaviour; the new one round-trips.
    assert Preprocess.from_dict({k: v for k, v in old.to_dict().items() if k != "upscale"}) == old
    assert Preprocess.from_dict(new.to_dict()) == new
