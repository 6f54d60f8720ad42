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
from tests.test_store import _InterruptAfter  # Ctrl-C once n files are handled

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


def test_a_file_system_without_locks_warns_and_indexes(
    tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    from pipelines.index_folder import Progress

    def no_locks(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    seen: list[str] = []

    class Warnings(Progress):
        def warn(self, message: str) -> None:
            seen.append(message)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    report = build_index(
        IndexConfig(images=samples / "test", index=tmp_path / "idx", backbone="pixels", workers=0), Warnings()
    )
    assert report.indexed == len(list((samples / "test").rglob("*.png")))
    assert len(seen) == 1 and "cannot be locked (No locks available" in seen[0]


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
    _stopped(IndexConfig(**cfg, shard_rows=4, dtype="bfloat16"), after=8)
    report = build_index(IndexConfig(**cfg, shard_rows=4, dtype="float32"))
    assert report.embedded == report.indexed  # nothing embedded in bf16 was mixed in


def _stopped(config: IndexConfig, after: int) -> None:
    with pytest.raises(KeyboardInterrupt):
        build_index(config, progress=_InterruptAfter(after))


def _interrupted(images: Path, index: Path, after: int) -> None:
    """A pixels run stopped once `after` files are handled; one file a shard."""
    cfg = IndexConfig(images=images, index=index, backbone="pixels", workers=0, batch_size=1, shard_rows=1)
    _stopped(cfg, after)


def test_a_file_broken_between_runs_is_ledgered_not_indexed_stale(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(4):
        _png(tmp_path / "imgs" / "a" / f"{i}.png", seed=i)
    _interrupted(tmp_path / "imgs", tmp_path / "idx", after=2)
    (tmp_path / "imgs" / "a" / "0.png").unlink()
    (tmp_path / "imgs" / "a" / "0.png").symlink_to("gone.png")  # embedded before; now cannot be read
    build_index(IndexConfig(images=tmp_path / "imgs", index=tmp_path / "idx", backbone="pixels", workers=0))
    idx = open_index(tmp_path / "idx")
    assert "a/0.png" not in idx.paths and [r["path"] for r in idx.skipped()] == ["a/0.png"]


def test_files_swapped_by_name_with_equal_size_and_mtime_are_re_embedded(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0), (9, 9, 9)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / "a" / f"{i}.bmp")  # same size
        os.utime(tmp_path / "imgs" / "a" / f"{i}.bmp", (1e9, 1e9))  # same mtime, as `cp -p` leaves
    _interrupted(tmp_path / "imgs", tmp_path / "idx", after=2)
    a, b = tmp_path / "imgs" / "a" / "0.bmp", tmp_path / "imgs" / "a" / "1.bmp"
    a.rename(tmp_path / "tmp.bmp")
    b.rename(a)
    (tmp_path / "tmp.bmp").rename(b)
    build_index(IndexConfig(images=tmp_path / "imgs", index=tmp_path / "idx", backbone="pixels", workers=0))
    _pixels(tmp_path / "imgs", tmp_path / "clean")
    np.testing.assert_array_equal(
        open_index(tmp_path / "idx").vectors(), open_index(tmp_path / "clean").vectors()
    )


def test_an_open_index_outlives_a_rebuild_or_says_to_reopen(tmp_path: Path, samples: Path) -> None:
    shutil.copytree(samples / "test", tmp_path / "imgs")
    _pixels(tmp_path / "imgs", tmp_path / "idx")
    used, unused = open_index(tmp_path / "idx"), open_index(tmp_path / "idx")
    before = used.search_ids([0], k=3)
    expected = np.array(used.vectors())  # read once: the handle keeps its generation mapped
    shutil.rmtree(tmp_path / "imgs" / "star")
    _pixels(tmp_path / "imgs", tmp_path / "idx")  # a new generation; the old one is deleted
    assert used.search_ids([0], k=3) == before
    np.testing.assert_array_equal(used.vectors(), expected)
    with pytest.raises(IndexFormatError, match="was rebuilt since it was opened here"):
        unused.vectors()
    # Deleted and built again: the new first generation has the old one's name.
    _pixels(tmp_path / "imgs", tmp_path / "idx2")
    fresh = open_index(tmp_path / "idx2")
    shutil.rmtree(tmp_path / "idx2")
    shutil.rmtree(tmp_path / "imgs" / "ring")
    _pixels(tmp_path / "imgs", tmp_path / "idx2")
    assert open_index(tmp_path / "idx2").manifest.generation == fresh.manifest.generation
    with pytest.raises(IndexFormatError, match="was rebuilt since it was opened here"):
        fresh.vectors()


def test_a_users_gen_folders_are_never_touched_and_foreign_folders_refused(tmp_path: Path) -> None:
    (tmp_path / "photos" / "gen-2023").mkdir(parents=True)
    _png(tmp_path / "photos" / "gen-2023" / "a.png")
    with pytest.raises(RetrieveError, match="not an index"):
        _pixels(tmp_path / "photos", tmp_path / "photos")  # --index pointed at the image folder
    assert (tmp_path / "photos" / "gen-2023" / "a.png").is_file()
    # An index folder that also holds a folder named like ours (but not ours) keeps it.
    _pixels(tmp_path / "photos", tmp_path / "idx")
    (tmp_path / "idx" / "gen-old").mkdir()
    _pixels(tmp_path / "photos", tmp_path / "idx")
    assert (tmp_path / "idx" / "gen-old").is_dir() and len(open_index(tmp_path / "idx")) == 1


def test_the_api_takes_what_it_documents_and_refuses_the_rest(pixel_index: Path, samples: Path) -> None:
    import torch

    idx = open_index(pixel_index)
    # An indexed image, by relative or absolute path, is looked up (and left out of its own
    # results) wherever the caller stands; a file elsewhere is embedded; lists may mix kinds.
    by_path = idx.search(idx.paths[3], k=2)
    assert by_path == idx.search_ids([3], k=2) == idx.search_ids(idx.paths[3], k=2)
    outside = pixel_index.parent / "copy.png"
    shutil.copy(samples / "test" / idx.paths[3], outside)
    mixed = idx.search([3, str(samples / "test" / idx.paths[3]), outside], k=2)
    assert mixed[0] == mixed[1] == by_path[0]
    assert mixed[2][0].id == 3 and mixed[2][0].distance == 0.0
    for k in (0, 2.5, "5", None, True):
        with pytest.raises(RetrieveError, match="k must be a whole number"):
            idx.search_ids([0], k=k)  # type: ignore[arg-type]
    bad = np.zeros((2, idx.dim), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(RetrieveError, match="NaN or infinity"):
        idx.search_vectors(bad, k=3)
    with pytest.raises(RetrieveError, match="search takes vectors, ids, or image paths"):
        idx.search(1.5)  # type: ignore[arg-type]
    with pytest.raises(RetrieveError, match="path of an index folder"):
        open_index(5)  # type: ignore[arg-type]
    # Loading a backbone from a checkpoint leaves the caller's random stream where it was.
    from retrieval.backbones import load_backbone
    from retrieval.checkpoint import Checkpoint, save_checkpoint

    spec = get_spec("lenet")
    model = spec.builder(3, spec.preprocess.channels)
    ckpt = Checkpoint(
        "lenet", model.state_dict(), ("a", "b", "c"), spec.preprocess, 3, spec.preprocess.channels
    )
    save_checkpoint(ckpt, pixel_index.parent / "lenet.pt")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_backbone(weights=pixel_index.parent / "lenet.pt")
    assert torch.equal(torch.rand(3), expected)


def test_a_map_of_too_few_images_says_it_is_pca(tmp_path: Path, samples: Path) -> None:
    from retrieval.maps import MapConfig, ProjectionParams, build_map

    (tmp_path / "few" / "a").mkdir(parents=True)
    for i in range(4):
        _png(tmp_path / "few" / "a" / f"{i}.png", seed=i)
    _pixels(tmp_path / "few", tmp_path / "idx")
    notes: list[str] = []
    cfg = MapConfig(out=tmp_path / "m.html", projection=ProjectionParams(method="tsne"))
    report = build_map(tmp_path / "idx", cfg, notes.append)  # a path is accepted too
    assert report.method == "pca" and any("too few for t-SNE" in n for n in notes)


def test_eval_says_when_ties_decide_the_ranked_metrics(tmp_path: Path, samples: Path) -> None:
    from retrieval.evaluate import evaluate_vectors

    x = np.zeros((15, 4), np.float32)  # one image copied 15 times into two classes
    res = evaluate_vectors(x, ["a"] * 12 + ["b"] * 3, ks=(1,))
    assert any("exactly tied distances" in n for n in res.notes)
    spread = np.random.default_rng(0).normal(size=(15, 4)).astype(np.float32)
    assert not any("tied" in n for n in evaluate_vectors(spread, ["a"] * 12 + ["b"] * 3, ks=(1,)).notes)


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
    # (query --id reads the FAISS index, not the vector files: it needs the metadata only)
    reader = (
        ["query", "--id", "0", "-i", pixel_index]
        if victim.endswith("parquet")
        else ["map", pixel_index, "-o", pixel_index.parent / "m.html"]
    )
    for args in (["eval", pixel_index], reader):
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


# -- train ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 grey 32 px images: a LeNet epoch takes well under a second."""
    from retrieval.samples import SampleConfig, make_samples

    cfg = SampleConfig(per_class=12, test_per_class=0, size=32, classes=("circle", "square", "triangle"))
    return make_samples(tmp_path_factory.mktemp("small"), cfg) / "train"


def _train(data: Path | None, out: Path | None, reporter=None, **kw):
    from retrieval.training import TrainConfig, train

    base = dict(arch="lenet", channels=1, epochs=2, batch_size=8, workers=1, val_fraction=0.25)
    return train(TrainConfig(data=data, out=out, **{**base, **kw}), reporter)


class _Crash:
    """A reporter that makes the run die (not Ctrl-C) at its first step, like a kill."""

    def message(self, text: str) -> None: ...
    def epoch(self, stats) -> None: ...
    def close(self) -> None: ...

    def step(self, epoch: int, step: int, steps: int) -> None:
        raise SystemError("killed")


def test_resume_refuses_flags_that_change_the_run_and_says_when_it_is_done(
    small: Path, tmp_path: Path
) -> None:
    from retrieval.training import TrainConfig, train

    _train(small, tmp_path / "run")
    with pytest.raises(RetrieveError, match=r"cannot change epochs 3 \(the run has 2\).*optimizer adamw"):
        train(TrainConfig(data=None, out=None, resume=tmp_path / "run", epochs=3, optimizer="adamw"))
    notes: list[str] = []

    class Notes:
        def message(self, text: str) -> None:
            notes.append(text)

        def step(self, *a) -> None:
            raise AssertionError("a finished run trained again")

        def epoch(self, stats) -> None: ...
        def close(self) -> None: ...

    result = train(TrainConfig(data=None, out=None, resume=tmp_path / "run", epochs=2), Notes())  # type: ignore[arg-type]
    assert result.finished and any("already finished all 2 epochs" in n for n in notes)


def test_overwrite_removes_the_old_runs_state_before_anything_else(small: Path, tmp_path: Path) -> None:
    _train(small, tmp_path / "run")
    (tmp_path / "run" / "skipped.txt").write_text("other/data.png\tbroken\n")
    with pytest.raises(SystemError):
        _train(small, tmp_path / "run", reporter=_Crash(), overwrite=True, arch="resnet8_small")
    left = {p.name for p in (tmp_path / "run").iterdir()}
    assert not left & {"last.pt", "best.pt", "skipped.txt", "metrics.jsonl"}, left


def test_a_run_killed_in_its_first_epoch_can_simply_be_started_again(small: Path, tmp_path: Path) -> None:
    from retrieval.training import TrainConfig, train

    with pytest.raises(SystemError):
        _train(small, tmp_path / "run", reporter=_Crash())
    assert (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(RetrieveError, match=r"stopped before its first epoch ended.*start it again"):
        train(TrainConfig(data=None, out=None, resume=tmp_path / "run"))
    assert _train(small, tmp_path / "run").epochs_completed == 2  # no "already holds a run"


def test_resume_survives_a_torn_metrics_line_and_names_a_damaged_split(small: Path, tmp_path: Path) -> None:
    from retrieval.training import TrainConfig, train

    _train(small, tmp_path / "run", epochs=3, stop_after_epochs=1)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])  # the append a kill cut short
    result = train(TrainConfig(data=None, out=None, resume=tmp_path / "run"))
    assert result.finished and [json.loads(ln)["epoch"] for ln in metrics.read_text().splitlines()] == [2, 3]
    _train(small, tmp_path / "run2", epochs=3, stop_after_epochs=1)
    (tmp_path / "run2" / "split.json").write_text("{bad")
    with pytest.raises(RetrieveError, match=r"split.json is damaged"):
        train(TrainConfig(data=None, out=None, resume=tmp_path / "run2"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", -1.0, "--lr must be a positive finite number"),
        ("lr", float("nan"), "--lr must be"),
        ("lr", float("inf"), "--lr must be"),
        ("weight_decay", -1.0, "--weight-decay must be"),
        ("warmup_epochs", float("nan"), "--warmup-epochs must be"),
        ("grad_clip", 0.0, "--grad-clip must be"),
        ("seed", -1, "--seed must be in"),
    ],
)
def test_bad_training_numbers_are_refused_up_front(field: str, value: float, message: str) -> None:
    from retrieval.training import TrainConfig

    with pytest.raises(RetrieveError) as caught:
        TrainConfig(data=Path("."), out=Path("x"), **{field: value})
    assert message in caught.value.for_cli()  # as the command line says it
    assert message.replace("--", "").replace("-", "_") in str(caught.value)  # the library names the setting


def test_bad_training_setups_are_one_clear_line(small: Path, tmp_path: Path) -> None:
    with pytest.raises(RetrieveError, match="crop_pad 100 must be smaller than the 32 px"):
        _train(small, tmp_path / "a", crop_pad=100)
    with pytest.raises(RetrieveError, match="no ImageNet weights to fine-tune"):
        _train(small, tmp_path / "b", pretrained="imagenet")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RetrieveError, match="is a file"):
        _train(small, tmp_path / "afile")
    with pytest.raises(RetrieveError, match="No training run at"):
        _train(None, None, resume=tmp_path / "nowhere")


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(small: Path, tmp_path: Path) -> None:
    from retrieval.backbones import load_backbone
    from retrieval.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(RetrieveError, match="Training diverged"):
        _train(small, tmp_path / "run", lr=1e30, optimizer="sgd", grad_clip=None)
    assert not (tmp_path / "run" / "last.pt").exists()  # no NaN weights were saved
    # A checkpoint that holds NaN anyway (written by other code) is refused by index and viz.
    good = _train(small, tmp_path / "ok", epochs=1)
    ckpt = load_checkpoint(good.best_checkpoint)
    next(iter(ckpt.state_dict.values())).view(-1)[0] = float("nan")
    save_checkpoint(ckpt, tmp_path / "nan.pt")
    with pytest.raises(RetrieveError, match="NaN or infinite weights"):
        load_backbone(weights=tmp_path / "nan.pt")


def test_a_link_to_another_class_folder_does_not_swallow_that_class(small: Path, tmp_path: Path) -> None:
    from retrieval.training import discover

    shutil.copytree(small, tmp_path / "data")
    (tmp_path / "data" / "circle" / "sq").symlink_to("../square")
    split = discover(tmp_path / "data", val_fraction=0)
    assert split.classes == ("circle", "square", "triangle")
    labels = {p: split.classes[i] for p, i in split.train}
    assert all(c == p.split("/")[0] for p, c in labels.items()) and len(labels) == 36


def test_stop_after_epochs_says_how_to_continue_and_moved_data_is_named(small: Path, tmp_path: Path) -> None:
    args = ["train", small, "--arch", "lenet", "--channels", "1", "--epochs", "3", "--batch-size", "8"]
    r = invoke(*args, "--stop-after-epochs", "1", "--out", tmp_path / "run", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "stopped after 1 epochs (--stop-after-epochs); continue with: retrieve train --resume" in " ".join(
        r.output.split()
    )
    moved = tmp_path / "moved"
    shutil.copytree(small, moved)
    # The checkpoint's copy of the config is what resume reads: point it at a folder that is gone.
    from retrieval.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    ckpt.extra["config"]["data"] = str(tmp_path / "gone")
    save_checkpoint(ckpt, tmp_path / "run" / "last.pt")
    r = invoke("train", "--resume", tmp_path / "run")
    assert r.exit_code == 2 and "is not there any more" in " ".join(r.output.split()), r.output
    r = invoke("train", moved, "--resume", tmp_path / "run")
    assert r.exit_code == 0, r.output


# -- regressions caught in review ----------------------------------------------------------------


def test_links_into_hidden_folders_are_followed(tmp_path: Path) -> None:
    from retrieval.images import scan

    for cls in ("square", "star"):
        (tmp_path / "root" / ".store" / cls).mkdir(parents=True)
        _png(tmp_path / "root" / ".store" / cls / "0.png")
        (tmp_path / "root" / cls).symlink_to(f".store/{cls}")
    assert [e.relpath for e in scan(tmp_path / "root")[0]] == ["square/0.png", "star/0.png"]


def test_train_out_never_takes_over_a_folder_of_other_files(small: Path, tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(RetrieveError, match="not a `retrieve train` run"):
        _train(small, tmp_path / "proj")
    assert (tmp_path / "proj" / "config.json").read_text() == '{"my": "settings"}'
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".DS_Store").touch()  # hidden files are not the user's work
    assert _train(small, tmp_path / "fresh", epochs=1, seed=5_000_000_000).epochs_completed == 1


def test_resume_accepts_flags_that_restate_what_the_run_chose(small: Path, tmp_path: Path) -> None:
    from retrieval.training import TrainConfig, train

    _train(small, tmp_path / "run", epochs=2, stop_after_epochs=1)  # image size and channels chosen
    done = train(TrainConfig(data=None, out=None, resume=tmp_path / "run", image_size=32, channels=1))
    assert done.finished
    with pytest.raises(RetrieveError, match=r"image_size 64 \(the run has 32\)"):
        train(TrainConfig(data=None, out=None, resume=tmp_path / "run", image_size=64))


def test_a_file_named_like_a_home_folder_is_just_a_file(
    pixel_index: Path, samples: Path, tmp_path: Path
) -> None:
    name = "~no_such_user_here.png"
    shutil.copy(samples / "test" / "star" / "0001.png", tmp_path / name)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = invoke("query", name, "-i", pixel_index, "-k", "1", "--json")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["neighbours"][0]["path"] == "star/0001.png"


def test_index_folder_guard_reads_the_manifest_and_ignores_hidden_files(
    tmp_path: Path, samples: Path
) -> None:
    (tmp_path / "webapp").mkdir()
    (tmp_path / "webapp" / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(RetrieveError, match="not an index"):
        _pixels(samples / "test", tmp_path / "webapp")
    assert (tmp_path / "webapp" / "manifest.json").read_text() == '{"name": "my web app"}'
    (tmp_path / "mnt" / "lost+found").mkdir(parents=True)
    (tmp_path / "mnt" / ".DS_Store").touch()
    _pixels(samples / "test", tmp_path / "mnt")
    assert len(open_index(tmp_path / "mnt")) > 0


def test_exact_reranking_memory_does_not_grow_with_k() -> None:
    import tracemalloc

    from retrieval.index import ExactIndex

    db = np.random.default_rng(0).random((5000, 512), dtype=np.float32)
    index = ExactIndex().fit(db)
    tracemalloc.start()
    index.search(db[:256], 400)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 120e6, peak  # 256 x 400 x 512 floats at once would be 210 MB (x2 for differences)
