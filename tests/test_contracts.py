"""Contracts a mutation run found unguarded: commit order, the resume key, palette transparency, the query
decode path, attribute quoting in every page, MAP@R at rank R, and the FC7 tap (issue #24).

Each test was checked to fail with its bug put back (the commit that added it says how).
"""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipelines.index_folder import build_index
from retrieval.api import open_index
from retrieval.backbones import get_spec, load_backbone
from retrieval.checkpoint import Checkpoint, save_checkpoint
from retrieval.cli import app
from retrieval.config import IndexConfig
from retrieval.images import open_image
from tests.test_store import _InterruptAfter  # Ctrl-C once n files are handled

runner = CliRunner()
GENERATION_FOLDER = re.compile(r"gen-\d{6,}")


def _smooth_jpeg(path: Path, seed: int, size: tuple[int, int] = (800, 600)) -> None:
    """A photo-like JPEG: smooth gradients plus noise, large enough for draft (DCT) downscaling."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack(
        [np.sin(xx * rng.uniform(2, 9) + c) * np.cos(yy * rng.uniform(2, 9)) for c in range(3)], -1
    )
    arr = (127 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def _squares(root: Path, n: int = 12) -> Path:
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


# -- 1. commit order: the generation is on disk before the manifest names it --------------------------


def test_a_failed_generation_rename_leaves_the_old_index_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _squares(tmp_path / "imgs")
    cfg = IndexConfig(images=images, index=tmp_path / "idx", backbone="pixels", workers=0)
    build_index(cfg)
    before = open_index(tmp_path / "idx")
    old_generation, old_vectors = before.manifest.generation, np.array(before.vectors())
    (images / "a" / "01.png").unlink()  # the rebuild would hold other vectors

    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if GENERATION_FOLDER.fullmatch(Path(dst).name):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    from retrieval.errors import NoSpaceError

    with pytest.raises(NoSpaceError, match="ran out of space during this build"):  # ENOSPC, said plainly
        build_index(cfg)
    monkeypatch.setattr(os, "replace", real_replace)

    after = open_index(tmp_path / "idx")  # opens: the manifest still names a whole generation
    assert after.manifest.generation == old_generation
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["generation"] == old_generation
    np.testing.assert_array_equal(np.asarray(after.vectors()), old_vectors)
    assert "a/01.png" in after.paths and len(after.skipped()) == 0


# -- 2. the resume key holds the weights ---------------------------------------------------------------


def _lenet_checkpoint(path: Path, seed: int) -> Path:
    spec = get_spec("lenet")
    torch.manual_seed(seed)
    model = spec.builder(spec.num_classes, spec.preprocess.channels)
    classes = tuple(f"c{i}" for i in range(spec.num_classes))
    ckpt = Checkpoint("lenet", model.state_dict(), classes, spec.preprocess, spec.num_classes, 3)
    return save_checkpoint(ckpt, path)


def test_a_run_resumed_with_other_weights_embeds_everything_again(tmp_path: Path, samples: Path) -> None:
    common = {"images": samples, "backbone": "lenet", "workers": 0, "batch_size": 4, "shard_rows": 8}
    common["dtype"] = "float32"
    with pytest.raises(KeyboardInterrupt):
        build_index(IndexConfig(index=tmp_path / "idx", weights="none", **common), _InterruptAfter(24))
    ckpt = _lenet_checkpoint(tmp_path / "other-seed.pt", seed=7)
    # Same architecture, layer, preprocessing, dimension and dtype: only the weights differ.
    assert load_backbone("lenet", ckpt).preprocess == load_backbone("lenet", "none").preprocess
    resumed = build_index(IndexConfig(index=tmp_path / "idx", weights=str(ckpt), **common))
    clean = build_index(IndexConfig(index=tmp_path / "clean", weights=str(ckpt), **common))
    assert resumed.embedded == resumed.indexed == clean.indexed == 72
    a, b = open_index(tmp_path / "idx"), open_index(tmp_path / "clean")
    assert a.paths == b.paths
    np.testing.assert_allclose(np.asarray(a.vectors()), np.asarray(b.vectors()), atol=1e-6)


# -- 3. palette transparency composites on white -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_a_transparent_palette_entry_reads_white(tmp_path: Path, fmt: str) -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # 0: black (transparent), 1: red
    img.putpixel((0, 0), 0)
    path = tmp_path / f"palette.{fmt.lower()}"
    img.save(path, format=fmt, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and raw.info.get("transparency") == 0  # the case under test
    rgb = open_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (255, 0, 0)


# -- 4. a query is decoded like the database, draft included ------------------------------------------


@pytest.mark.parametrize("backbone", ["pixels", "lenet"])
def test_large_jpegs_queried_from_disk_are_at_distance_zero(tmp_path: Path, backbone: str) -> None:
    images = tmp_path / "photos"
    for i in range(6):
        (images / ("x" if i % 2 else "y")).mkdir(parents=True, exist_ok=True)
        _smooth_jpeg(images / ("x" if i % 2 else "y") / f"{i}.jpg", seed=i)
    build_index(
        IndexConfig(images=images, index=tmp_path / "idx", backbone=backbone, workers=1, dtype="float32")
    )
    idx = open_index(tmp_path / "idx")
    with Image.open(images / "y" / "0.jpg") as probe:
        probe.draft("RGB", (32, 32))
        assert probe.size[0] < 800  # draft really applies to these files
    files = [idx.root / p for p in idx.paths]
    for f, hits in zip(files, idx.search_paths(files, k=1), strict=True):
        assert hits[0].path == f.relative_to(idx.root).as_posix()
        assert hits[0].distance < 1e-5, (f.name, hits[0].distance)


# -- 5. no file name becomes an attribute, in any page -------------------------------------------------

HOSTILE = ['x" onerror="alert(1).png', "y' onmouseover='alert(2).png"]


class _Attributes(HTMLParser):
    """Every attribute name in a page, and whether it parsed to the end."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.names.update(name for name, _ in attrs)


def _attributes(page: Path) -> set[str]:
    parser = _Attributes()
    parser.feed(page.read_text())
    parser.close()
    return parser.names


@pytest.fixture(scope="module")
def hostile_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _squares(tmp_path_factory.mktemp("hostile") / "imgs")
    for i, name in enumerate(HOSTILE):
        Image.new("RGB", (24, 24), (200, 30 * i, 10)).save(root / "a" / name, format="PNG")
    index = root.parent / "idx"
    build_index(IndexConfig(images=root, index=index, backbone="pixels", workers=0))
    assert set(HOSTILE) <= {Path(p).name for p in open_index(index).paths}
    return index


def test_the_neighbours_sheet_quotes_attributes(hostile_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "sheet.html"
    queries = open_index(hostile_index).root / "a"
    res = runner.invoke(app, ["neighbours", str(hostile_index), "--queries", str(queries), "--out", str(out)])
    assert res.exit_code == 0, res.output
    names = _attributes(out)
    assert not {"onerror", "onmouseover"} & names, names
    page = out.read_text()
    assert "&quot; onerror=&quot;alert(1).png" in page and "&#x27; onmouseover=&#x27;alert(2).png" in page


def test_the_map_quotes_attributes(hostile_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.html"
    res = runner.invoke(app, ["map", str(hostile_index), "--method", "pca", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not {"onerror", "onmouseover"} & _attributes(out)
    page = out.read_text()
    data = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', page, re.S)
    assert data and set(HOSTILE) <= {Path(p).name for p in json.loads(data.group(1))["paths"]}


def test_the_saliency_report_quotes_attributes(hostile_index: Path, tmp_path: Path) -> None:
    images = open_index(hostile_index).root / "a"
    res = runner.invoke(
        app,
        [
            "viz",
            "saliency",
            str(images),
            "--backbone",
            "lenet",
            "--weights",
            "none",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = tmp_path / "s" / "report.html"
    assert not {"onerror", "onmouseover"} & _attributes(report)
    page = report.read_text()
    # Links are URL-quoted: no quote of a name survives into an href.
    assert "%22%20onerror%3D%22alert%281%29.png" in page and "%27%20onmouseover%3D%27alert%282%29.png" in page


# -- smaller gaps ----------------------------------------------------------------------------------------


def test_map_at_r_counts_a_relevant_item_exactly_at_rank_r() -> None:
    from retrieval.evaluate import map_at_r

    rel = np.array([[0, 1, 0, 0], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    n_relevant = np.array([2, 3, 3])
    # By hand: 1/R * sum over i <= R of P(i) * rel(i).
    want = [(1 / 2) / 2, (1 + 2 / 3) / 3, (1 / 3) / 3]
    np.testing.assert_allclose(map_at_r(rel, n_relevant), want)


@pytest.mark.parametrize(("name", "linear"), [("vgg11", "classifier.3"), ("alexnet", "classifier.4")])
def test_fc7_is_the_relu_of_the_second_fully_connected_layer(name: str, linear: str) -> None:
    backbone = load_backbone(name, "none")
    model = backbone.model
    spec = get_spec(name)
    # The tapped node is a ReLU right after the second Linear of the classifier (VGG's classifier.5,
    # a Dropout, gives the same numbers in eval mode: only the module's kind tells them apart).
    assert isinstance(model.get_submodule(spec.node), torch.nn.ReLU)
    linears = [n for n, m in model.classifier.named_children() if isinstance(m, torch.nn.Linear)]
    assert f"classifier.{linears[1]}" == linear and int(spec.node.split(".")[1]) == int(linears[1]) + 1
    seen: dict[str, torch.Tensor] = {}  # cloned: the ReLU after it works in place
    hook = model.get_submodule(linear).register_forward_hook(
        lambda m, i, o: seen.update(fc=o.detach().clone())
    )
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x)
        features = backbone(x)
    hook.remove()
    assert (seen["fc"] < 0).any()  # so a tap before the ReLU would differ
    torch.testing.assert_close(features, torch.relu(seen["fc"]))
