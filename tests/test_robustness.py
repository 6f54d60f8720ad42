"""Hostile names, damaged indexes, odd outputs and concurrent runs: a clear line or a ledger entry, never
a traceback, and nothing replaced that should not be (defects found by a black-box review)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.index_folder import build_index
from retrieval.api import open_index
from retrieval.atomic import atomic_write
from retrieval.backbones import get_spec
from retrieval.cli import app
from retrieval.config import IndexConfig
from retrieval.errors import IndexFormatError, RetrieveError
from retrieval.images import Transform
from retrieval.store import writer_lock

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _png(path: Path | bytes, seed: int = 0, size: tuple[int, int] = (40, 40)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="PNG")


def _pixels(images: Path, index: Path, **kw) -> None:
    build_index(IndexConfig(images=images, index=index, backbone="pixels", workers=0, **kw))


@pytest.fixture()
def pixel_index(tmp_path: Path, samples: Path) -> Path:
    _pixels(samples / "test", tmp_path / "idx")
    return tmp_path / "idx"


# -- concurrent runs -------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_the_first_index_is_whole(tmp_path: Path, samples: Path) -> None:
    index = tmp_path / "idx"
    with writer_lock(index), pytest.raises(RetrieveError, match=r"Another `retrieve index`.*is writing"):
        _pixels(samples / "train", index)
    _pixels(samples / "train", index)  # the lock is released with its holder
    assert len(open_index(index)) == len(list((samples / "train").rglob("*.png")))


def test_a_run_that_fails_early_leaves_no_empty_index_folder(tmp_path: Path, samples: Path) -> None:
    with pytest.raises(RetrieveError, match="Unknown backbone"):
        build_index(IndexConfig(images=samples, index=tmp_path / "new", backbone="nope", workers=0))
    assert not (tmp_path / "new").exists()


def test_an_index_path_that_is_a_file_is_a_clear_error(tmp_path: Path, samples: Path) -> None:
    (tmp_path / "afile").write_text("keep me")
    r = invoke("index", samples / "test", "-b", "pixels", "-i", tmp_path / "afile")
    assert r.exit_code == 2 and "is a file, not an index folder" in r.output
    assert (tmp_path / "afile").read_text() == "keep me"


def test_staging_is_not_reused_across_dtypes(tmp_path: Path, samples: Path) -> None:
    cfg = dict(images=samples / "test", index=tmp_path / "idx", backbone="lenet", workers=0, batch_size=4)
    cfg["shard_rows"] = 4

    class Stop:
        seen = 0

        def start(self, *a) -> None: ...
        def note(self, *a) -> None: ...
        def warn(self, *a) -> None: ...
        def stop(self) -> None: ...

        def advance(self, n: int) -> None:
            Stop.seen += n
            if Stop.seen >= 8:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(IndexConfig(**cfg, dtype="bfloat16"), progress=Stop())  # type: ignore[arg-type]
    report = build_index(IndexConfig(**cfg, dtype="float32"))
    assert report.embedded == report.indexed  # nothing embedded in bf16 was mixed in


# -- names ------------------------------------------------------------------------------------------


def test_a_non_utf8_file_name_is_skipped_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    _png(tmp_path / "imgs" / "a" / "ok.png")
    try:
        _png(os.fsencode(tmp_path / "imgs" / "a") + b"/caf\xe9.png", seed=1)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    _pixels(tmp_path / "imgs", tmp_path / "idx")
    idx = open_index(tmp_path / "idx")
    assert idx.paths == ["a/ok.png"]
    assert [(r["path"], r["reason"].split(":")[0]) for r in idx.skipped()] == [
        ("a/caf\\xe9.png", "file name is not valid UTF-8")
    ]


def test_names_with_brackets_are_printed_as_they_are(tmp_path: Path) -> None:
    # Rich markup would style `[red]x` away and raise on `[/]`.
    for i, rel in enumerate(["a[/]b.png", "[red]x/c[bold]d.png", "[red]x/e.png"]):
        (tmp_path / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        _png(tmp_path / "imgs" / rel, seed=i)
    _pixels(tmp_path / "imgs", tmp_path / "idx")
    wide = {"COLUMNS": "200"}
    r = runner.invoke(
        app, ["query", str(tmp_path / "imgs" / "a[" / "]b.png"), "-i", str(tmp_path / "idx")], env=wide
    )
    assert r.exit_code == 0, r.output
    assert "[red]x/c[bold]d.png" in r.output and "[red]x/e.png" in r.output
    r = runner.invoke(app, ["info", str(tmp_path / "idx")], env=wide)
    assert r.exit_code == 0 and "[red]x (2)" in r.output


def test_query_paths_expand_home_and_ids_accept_dot_slash(
    pixel_index: Path, samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(samples / "test" / "star" / "0001.png", tmp_path / "q.png")
    r = invoke("query", "~/q.png", "-i", pixel_index, "-k", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["neighbours"][0]["path"] == "star/0001.png"
    r = invoke("query", "--id", "./star/0001.png", "-i", pixel_index, "-k", "1", "--json")
    assert r.exit_code == 0, r.output


# -- images -----------------------------------------------------------------------------------------


def test_very_thin_images_resize_only_the_kept_box(monkeypatch: pytest.MonkeyPatch) -> None:
    t = Transform(get_spec("resnet18").preprocess)
    pre = t.pre
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 2000, 3), dtype=np.uint8))
    # Oracle: the plain resize-the-whole-image-then-crop that the box path stands in for.
    w, h = wide.size
    s = pre.resize / min(w, h)
    nw, nh = max(pre.size, round(w * s)), max(pre.size, round(h * s))
    left, top = (nw - pre.size) // 2, (nh - pre.size) // 2
    full = wide.resize((nw, nh), t.resample, reducing_gap=3.0).crop(
        (left, top, left + pre.size, top + pre.size)
    )
    got = np.asarray(t.resize_crop(wide), dtype=int)
    assert np.abs(got - np.asarray(full, dtype=int)).max() <= 1
    # 1 x 50,000 px would be resized to 256 x 12.8M (~10 GB) by the plain path: record what PIL
    # is asked to allocate.
    asked: list[int] = []
    resize = Image.Image.resize

    def spy(self, size, *a, **kw):
        asked.append(size[0] * size[1])
        return resize(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    thin = Image.fromarray(np.zeros((50_000, 1, 3), np.uint8))
    assert t.resize_crop(thin).size == (pre.size, pre.size)
    assert max(asked) <= 16 * pre.size**2


def test_exif_rotated_images_record_their_displayed_size(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (200, 10, 10)).save(tmp_path / "imgs" / "rot.jpg", exif=exif)
    _pixels(tmp_path / "imgs", tmp_path / "idx")
    row = open_index(tmp_path / "idx").metadata.to_pylist()[0]
    assert (row["width"], row["height"]) == (40, 80)


# -- damaged indexes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: [], "not a retrieve index manifest"),
        (lambda m: {"format": "retrieve-index"}, "missing or malformed root"),
        (lambda m: {**m, "format_version": "x"}, "format_version is 'x'"),
        (lambda m: {**m, "generation": "../../elsewhere/gen-000001"}, "outside the index's own layout"),
        (lambda m: {**m, "vector_files": ["../../etc/passwd"]}, "outside the index's own layout"),
        (lambda m: {**m, "counts": {}}, "malformed counts"),
    ],
)
def test_a_damaged_manifest_is_one_clear_line(pixel_index: Path, damage, message: str) -> None:
    path = pixel_index / "manifest.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(IndexFormatError, match=message):
        open_index(pixel_index)
    r = invoke("info", pixel_index)
    assert r.exit_code == 2 and message.split("'")[0] in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("victim", ["vectors-00000.npy", "metadata.parquet"])
def test_a_damaged_data_file_is_one_clear_line(pixel_index: Path, victim: str) -> None:
    (open_index(pixel_index).dir / victim).write_bytes(b"junk")
    for args in (["eval", pixel_index], ["query", "--id", "0", "-i", pixel_index]):
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert "is damaged" in r.output and "Traceback" not in r.output and "allow_pickle" not in r.output


def test_an_empty_checkpoint_file_is_a_clear_error(tmp_path: Path, samples: Path) -> None:
    (tmp_path / "empty.pt").touch()
    r = invoke("index", samples / "test", "--weights", tmp_path / "empty.pt", "-i", tmp_path / "i")
    assert r.exit_code == 2 and "not a readable checkpoint" in r.output


def test_pixels_refuses_weights(tmp_path: Path, samples: Path) -> None:
    r = invoke("index", samples / "test", "-b", "pixels", "--weights", "imagenet", "-i", tmp_path / "i")
    assert r.exit_code == 2 and "has no weights" in r.output


# -- outputs ----------------------------------------------------------------------------------------


def test_atomic_write_goes_through_links_and_refuses_special_files(tmp_path: Path) -> None:
    (tmp_path / "real.html").write_text("old")
    (tmp_path / "link.html").symlink_to("real.html")
    atomic_write(tmp_path / "link.html", lambda fh: fh.write(b"new"))
    assert (tmp_path / "link.html").is_symlink() and (tmp_path / "real.html").read_text() == "new"
    os.mkfifo(tmp_path / "pipe.html")
    (tmp_path / "folder").mkdir()
    with pytest.raises(RetrieveError, match="it is not a regular file"):
        atomic_write(tmp_path / "pipe.html", lambda fh: fh.write(b"x"))
    with pytest.raises(RetrieveError, match="it is a folder"):
        atomic_write(tmp_path / "folder", lambda fh: fh.write(b"x"))
    assert (tmp_path / "folder").is_dir() and not (tmp_path / "pipe.html").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "-m", "pca", "-o", "{tmp}/folder"], "it is a folder"),
        (["map", "-m", "pca", "-o", "{tmp}/m.png"], "name the output .html"),
        (["map", "-m", "pca", "--grid", "3x3", "-o", "{tmp}/g.html"], "name the output .png"),
        (["map", "-m", "umap", "--min-dist", "-1", "-o", "{tmp}/u.html"], "--min-dist must be between"),
        (["neighbours", "-n", "2", "-o", "{tmp}/sheet.png"], "name it .html"),
    ],
)
def test_output_mistakes_are_clear_errors(
    pixel_index: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "folder").mkdir()
    cmd, *rest = args
    r = invoke(cmd, pixel_index, *(a.format(tmp=tmp_path) for a in rest))
    assert r.exit_code == 2, r.output
    assert message in r.output.replace("\n", " ") and "Traceback" not in r.output
    assert (tmp_path / "folder").is_dir() and not list(tmp_path.glob("*.png"))


# -- eval -------------------------------------------------------------------------------------------


def test_eval_of_one_image_is_a_clear_error(tmp_path: Path, samples: Path) -> None:
    (tmp_path / "one" / "a").mkdir(parents=True)
    shutil.copy(samples / "test" / "star" / "0001.png", tmp_path / "one" / "a")
    _pixels(tmp_path / "one", tmp_path / "idx")
    r = invoke("eval", tmp_path / "idx")
    assert r.exit_code == 2 and "needs at least 2 images" in r.output


def test_eval_json_is_strict_json_and_one_label_is_flagged(tmp_path: Path, samples: Path) -> None:
    for label, src in [("a", "star/0001.png"), ("b", "ring/0001.png")]:
        (tmp_path / "two" / label).mkdir(parents=True)
        shutil.copy(samples / "test" / src, tmp_path / "two" / label)
    _pixels(tmp_path / "two", tmp_path / "idx2")
    r = invoke("eval", tmp_path / "idx2", "--json")
    assert r.exit_code == 0, r.output

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    metrics = json.loads(r.stdout, parse_constant=refuse)["spaces"][0]["metrics"]
    assert metrics["P@1"] is None and metrics["kNN@1"] == 0.0  # no query has a relevant item
    (tmp_path / "flat").mkdir()
    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.png", seed=i)
    _pixels(tmp_path / "flat", tmp_path / "idx1")
    r = invoke("eval", tmp_path / "idx1")
    assert r.exit_code == 0 and "every indexed image has the same label" in r.output.replace("\n", " ")
