"""`retrieve map`: projections against numpy oracles, the cache, sampling, grids, escaping, and the page
itself driven in headless Chromium with the network off."""

from __future__ import annotations

import base64
import html.parser
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval import maps
from retrieval.api import open_index
from retrieval.cli import app
from retrieval.errors import RetrieveError, UnknownNameError
from retrieval.maps import (
    MapConfig,
    MapPage,
    ProjectionParams,
    build_map,
    grid_assign,
    project,
    stratified_sample,
)
from retrieval.maps import projection as map_projection
from retrieval.maps.grid import _unit
from retrieval.maps.page import page_payload

runner = CliRunner()
# Linux file names cannot hold "/", so this is the folder `"><script>alert(1)<` (which is also the
# label) holding `script>.png`: the relative path reads exactly as the attack string.
EVIL = '"><script>alert(1)</script>.png'
EVIL_LABEL = '"><script>alert(1)<'
EVIL_DIR = "<img src=x onerror=alert(2)>"  # a label that is an HTML payload on its own


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def clusters(n: int, dim: int, k: int, seed: int = 0, spread: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """n points in k well separated Gaussian clusters: (vectors, cluster of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * spread
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def page_data(page: Path) -> dict:
    text = page.read_text()
    m = re.search(r'<script type="application/json" id="map-data">(.*?)</script>', text, re.S)
    assert m, "the page has no data block"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    """The sample images plus two files whose path and label are HTML/JS payloads, indexed by pixels."""
    root = tmp_path_factory.mktemp("map") / "imgs"
    shutil.copytree(samples, root)
    (root / EVIL).parent.mkdir(parents=True)
    (root / EVIL_DIR).mkdir()
    # Mirrored copies: images of their own, so their points do not sit on top of the originals.
    for src, dst in (("train/star/0000.png", EVIL), ("train/ring/0000.png", f"{EVIL_DIR}/x.png")):
        Image.open(samples / src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / dst)
    out = root.parent / "idx"
    r = invoke("index", root, "--index", out, "--backbone", "pixels", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert len(open_index(out)) == 74
    return out


# ----------------------------------------------------------------------------------------------
# Projections


def test_pca_matches_numpy_svd() -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(300, 20)) * np.linspace(5, 0.5, 20)).astype(np.float32) + 7
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    ref = (x - x.mean(0)) @ vt[:2].T
    proj = maps.run_projection(x, ProjectionParams(method="pca"))
    got = proj.coords
    signs = np.sign((got * ref).sum(0))  # components are defined up to sign
    np.testing.assert_allclose(got * signs, ref, rtol=1e-3, atol=1e-3)
    ratio = s**2 / (s**2).sum()
    np.testing.assert_allclose(proj.explained_variance, ratio[:2], rtol=1e-4)
    assert "PC1" in proj.variance_note and f"{ratio[0]:.1%}" in proj.variance_note
    np.testing.assert_allclose(project(x, "pca"), got)
    # t-SNE/UMAP first reduce to pca_dims components and report the variance they keep.
    tsne = maps.run_projection(x[:120], ProjectionParams(method="tsne", pca_dims=5))
    _, s2, _ = np.linalg.svd(x[:120] - x[:120].mean(0), full_matrices=False)
    np.testing.assert_allclose(tsne.explained_variance, (s2**2 / (s2**2).sum())[:5], rtol=1e-4)
    assert f"{(s2[:5] ** 2).sum() / (s2**2).sum():.1%}" in tsne.variance_note


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_projection_is_seeded_and_keeps_clusters(method: str) -> None:
    x, y = clusters(160, 60, 4, seed=1)
    a = project(x, method, seed=0, jobs=1)
    b = project(x, method, seed=0, jobs=1)
    c = project(x, method, seed=1, jobs=1)
    assert a.shape == (160, 2) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # t-SNE starts from the principal components and its gradient has no randomness: the seed has
    # nothing to change. UMAP's layout samples edges and negatives with the seed.
    assert np.allclose(a, c) if method == "tsne" else not np.allclose(a, c)
    # Oracle: every point's nearest neighbour in 2-D is from its own cluster, as in the original space.
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() > 0.95


def test_projection_rejects_bad_input() -> None:
    with pytest.raises(RetrieveError, match="NaN"):
        project(np.full((20, 3), np.nan, np.float32), "pca")
    with pytest.raises(UnknownNameError, match="tsne, umap, pca"):
        project(np.zeros((20, 3), np.float32), "mds")
    with pytest.raises(RetrieveError, match="Unknown projection options"):
        project(np.zeros((20, 3), np.float32), "pca", perplexty=5)


def test_cache_reused_until_vectors_or_parameters_change(
    index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    calls: list[ProjectionParams] = []
    real = map_projection.run_projection
    monkeypatch.setattr(
        map_projection, "run_projection", lambda v, p, jobs=None: calls.append(p) or real(v, p, jobs)
    )

    def run(**kw: object) -> tuple[maps.MapReport, dict]:
        params = ProjectionParams(**{"method": "pca", **kw})
        report = build_map(open_index(copy), MapConfig(out=tmp_path / "m.html", projection=params))
        return report, page_data(tmp_path / "m.html")

    first, d1 = run()
    again, d2 = run()
    assert len(calls) == 1 and not first.cached["projection"] and again.cached["projection"]
    assert d1["xy"] == d2["xy"] and again.explained_variance == first.explained_variance
    run(seed=1)  # another parameter: recomputed
    assert len(calls) == 2
    run()  # back to the first: still cached
    assert len(calls) == 2
    # Same generation, other numbers in the vectors file: the cache must notice.
    gen = next(copy.glob("gen-*"))
    vec_file = next(gen.glob("vectors-*.npy"))
    v = np.load(vec_file)
    np.save(vec_file, v[::-1].copy())
    changed, d3 = run()
    assert len(calls) == 3 and not changed.cached["projection"] and d3["xy"] != d1["xy"]


def test_thumbnail_cache_follows_edited_files(samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    shutil.copytree(samples / "train" / "star", root / "star")
    r = invoke("index", root, "--index", tmp_path / "idx", "--backbone", "pixels", "--workers", "0")
    assert r.exit_code == 0, r.output
    idx = open_index(tmp_path / "idx")
    ids = np.arange(len(idx))
    first, missing, hit = maps.cached_atlases(idx, ids, 32, jobs=1)
    assert not hit and not missing
    assert maps.cached_atlases(idx, ids, 32, jobs=1)[2]  # unchanged files: served from the cache
    # The same path with other pixels (an edit in place): the cache must not serve the old thumbnail.
    target = root / idx.paths[0]
    Image.new("RGB", Image.open(target).size, (255, 0, 0)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    edited, _, hit = maps.cached_atlases(idx, ids, 32, jobs=1)
    assert not hit and edited != first
    assert np.asarray(Image.open(io.BytesIO(edited[0])))[:32, :32].mean((0, 1))[0] > 200  # red now
    target.unlink()  # gone: a placeholder, and listed as missing, not an old cached thumbnail
    _, missing, hit = maps.cached_atlases(idx, ids, 32, jobs=1)
    assert not hit and missing == [idx.paths[0]]


# ----------------------------------------------------------------------------------------------
# Sampling and grids


def test_stratified_sample_counts_and_is_seeded() -> None:
    labels = ["a"] * 500 + ["b"] * 300 + ["c"] * 10 + ["d"]
    ids = stratified_sample(labels, 81, seed=0)
    assert len(ids) == 81 and len(set(ids.tolist())) == 81 and (np.diff(ids) > 0).all()
    got = {k: sum(labels[i] == k for i in ids) for k in "abcd"}
    assert got["d"] == 1 and got["c"] >= 1  # every class kept while the budget allows
    for k, n in (("a", 500), ("b", 300)):
        assert abs(got[k] - 81 * n / len(labels)) <= 1.5
    np.testing.assert_array_equal(ids, stratified_sample(labels, 81, seed=0))
    assert not np.array_equal(ids, stratified_sample(labels, 81, seed=1))
    np.testing.assert_array_equal(stratified_sample(labels, 10_000), np.arange(len(labels)))


def test_max_points_page_states_how_many(index: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.html"
    r = invoke("map", index, "--method", "pca", "--max-points", "20", "--out", out)
    assert r.exit_code == 0, r.output
    assert "20 of 74" in r.output
    d = page_data(out)
    assert d["shown"] == 20 and d["total"] == 74
    labels = [d["labelNames"][c] for c in np.frombuffer(base64.b64decode(d["labels"]), "<u4")]
    assert len(set(labels[:20])) == 10  # all 10 labels survive a 20-of-74 stratified sample


def test_a_sampled_map_lists_only_neighbours_that_are_on_it(index: Path, tmp_path: Path) -> None:
    # The demo's map showed 2,000 of 8,000 images and most listed neighbours were grey "not in
    # the sample" boxes. Now they are the nearest among the shown ones: oracle, brute force.
    out = tmp_path / "s.html"
    r = invoke("map", index, "--method", "pca", "--max-points", "30", "-k", "4", "--out", out)
    assert r.exit_code == 0, r.output
    d = page_data(out)
    m = d["shown"]
    assert m == 30 and d["items"] == m  # no item off the map
    assert d["title"] == f"{open_index(index).root.name} in raw-pixel space: PCA of 30 of 74 images"
    ids = np.frombuffer(base64.b64decode(d["ids"]), "<i4")
    nb = np.frombuffer(base64.b64decode(d["neighbours"]), "<i4").reshape(m, 4)
    dist = np.frombuffer(base64.b64decode(d["distances"]), "<f4").reshape(m, 4)
    x = np.asarray(open_index(index).vectors(), np.float64)[ids]
    full = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :4], rtol=1e-4, atol=1e-4)
    assert (nb >= 0).all() and (nb < m).all()
    np.testing.assert_allclose(full[np.arange(m)[:, None], nb], dist, rtol=1e-4, atol=1e-4)


def test_grid_assignment_matches_brute_force_on_a_tiny_grid() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(size=(9, 2))
    cells = grid_assign(pts, 3, 3)
    assert sorted(cells.tolist()) == list(range(9))
    u = _unit(pts) * [3, 3]
    centres = np.stack(np.meshgrid(np.arange(3) + 0.5, np.arange(3) + 0.5), -1).reshape(-1, 2)
    cost = ((u[:, None] - centres[None]) ** 2).sum(-1)
    perms = np.array(list(itertools.permutations(range(9))))
    best = cost[np.arange(9), perms].sum(1).min()
    assert cost[np.arange(9), cells].sum() == pytest.approx(best)


@pytest.mark.parametrize(("w", "h", "n"), [(10, 10, 100), (12, 9, 90), (60, 60, 3600)])
def test_grid_assignment_is_a_permutation_that_keeps_neighbours(w: int, h: int, n: int) -> None:
    coords, _ = clusters(n, 2, 6, seed=w, spread=3.0)
    cells = grid_assign(coords, w, h)  # 60x60 takes the tiled approximation
    assert len(np.unique(cells)) == n and cells.min() >= 0 and cells.max() < w * h
    pos = np.stack([cells % w, cells // w], 1).astype(np.float64)
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = d.argmin(1)
    kept = np.abs(pos - pos[nn]).sum(1).mean()
    rand = np.random.default_rng(0).permutation(w * h)[:n]
    rpos = np.stack([rand % w, rand // w], 1)
    assert kept < 0.25 * np.abs(rpos - rpos[nn]).sum(1).mean()
    assert kept < 3.0  # a 2-D neighbour lands a few cells away, not across the grid


def test_grid_png_has_one_thumbnail_per_point(index: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    r = invoke("map", index, "--method", "pca", "--grid", "10x10", "--out", out, "--thumb-size", "16")
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (160, 160, 3)
    tiles = img.reshape(10, 16, 10, 16, 3).transpose(0, 2, 1, 3, 4).reshape(100, -1)
    filled = (tiles != 255).any(1)
    assert filled.sum() == 74  # 74 images, 26 white cells
    r = invoke("map", index, "--grid", "4x4", "--method", "pca", "--out", tmp_path / "small.png")
    assert r.exit_code == 0 and "16 of 74" in r.output  # more images than cells: a stated sample


def test_bad_options_are_one_line_errors(index: Path, tmp_path: Path) -> None:
    for args in (["--method", "mds"], ["--grid", "ten"], ["--thumb-size", "20"], ["--color-by", "size"]):
        r = invoke("map", index, "--out", tmp_path / "x.html", *args)
        assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)


# ----------------------------------------------------------------------------------------------
# Escaping


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def test_file_names_and_labels_are_escaped(index: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.html"
    title = "</title><script>alert(3)</script>"
    build_map(
        open_index(index),
        MapConfig(out=out, projection=ProjectionParams(method="pca"), title=title, color_by="folder"),
    )
    text = out.read_text()
    for payload in ("<script>alert", "<img src=x"):  # "<" is \u003c in the data: inert text
        assert payload not in text
    p = _Tags()
    p.feed(text)
    assert p.title == title  # shown as text, not parsed as tags
    scripts = [a for t, a in p.tags if t == "script"]
    # One code block (no src), one JSON data block, the rest inert base64 atlases.
    assert [a.get("type") for a in scripts].count(None) == 1 and not any("src" in a for a in scripts)
    assert {a.get("type") for a in scripts} <= {None, "application/json", "text/plain"}
    assert not any(k.startswith("on") for _, a in p.tags for k in a)
    d = page_data(out)
    assert EVIL in d["paths"] and f"{EVIL_DIR}/x.png" in d["paths"]
    assert EVIL_LABEL in d["labelNames"] and EVIL_DIR in d["labelNames"]
    assert EVIL_DIR in d["groupNames"]  # --color-by folder: the first path component


# ----------------------------------------------------------------------------------------------
# The page in a real browser


def _chromium() -> str:
    exe = os.environ.get("RETRIEVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    why = ""
    if not exe:
        why = "no Chromium found (set RETRIEVE_CHROMIUM or install Debian's chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "playwright (python) is not installed"
    if why:
        if os.environ.get("RETRIEVE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RETRIEVE_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return str(exe)


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=exe)
        except Exception as exc:
            if os.environ.get("RETRIEVE_REQUIRE_BROWSER") == "1":
                raise
            pytest.skip(f"Chromium at {exe} does not start: {exc}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def page_file(index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page as a user makes it: `retrieve map` in a real subprocess (t-SNE, the default)."""
    out = tmp_path_factory.mktemp("page") / "map.html"
    exe = Path(sys.executable).with_name("retrieve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "retrieval"]
    r = subprocess.run(
        [*cmd, "map", str(index), "--out", str(out), "-k", "5"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "t-SNE of 74 images" in r.stderr and "Traceback" not in r.stderr
    return out


class Session:
    """One headless page with every non-file request aborted, and a record of what happened."""

    def __init__(self, browser, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1100, "height": 760})
        self.blocked: list[str] = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.as_uri())
        # Poll from Python: the page's CSP forbids the eval that page.wait_for_function needs.
        self.wait("window.__map && __map.atlasesLoaded === __map.atlases && __map.frames > 1")

    def _route(self, route) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def js(self, expr: str):
        return self.page.evaluate(expr)

    def wait(self, expr: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while not self.js(f"!!({expr})"):
            assert time.monotonic() < end, f"timed out waiting for {expr}"
            time.sleep(0.03)

    def redraw(self, action) -> None:
        """Do `action` and wait for the frame it schedules."""
        n = self.js("__map.frames")
        action()
        self.wait(f"__map.frames > {n}")

    def point(self, path: str) -> tuple[float, float]:
        i = self.js(f"__map.itemOf({json.dumps(path)})")
        assert i >= 0, path
        return self.js(f"__map.screenPos({i})")


@pytest.fixture
def session(browser, page_file: Path):
    s = Session(browser, page_file)
    yield s
    s.page.close()
    assert not s.errors, s.errors


@pytest.mark.browser
def test_page_draws_every_point_offline(session: Session, index: Path) -> None:
    assert session.js("__map.drawn") == len(open_index(index)) == session.js("__map.shown") == 74
    assert session.js("__map.thumbsDrawn") == 74  # every image as a thumbnail, not a dot
    assert session.js("__map.atlases") >= 1
    assert session.page.text_content("#count") == "74 images"
    assert session.blocked == [] and session.dialogs == []


@pytest.mark.browser
def test_hover_shows_preview_with_path_and_label(session: Session) -> None:
    path = "train/heart/0003.png"
    x, y = session.point(path)
    session.page.mouse.move(x, y)
    assert session.page.is_visible("#preview")
    assert session.page.text_content("#preview-path") == path
    assert session.page.text_content("#preview-label").startswith("heart")
    # Sharp: the original file replaces the 64 px thumbnail once it has loaded from disk.
    session.wait("__map.previewSource === 'original'")
    session.page.mouse.move(1, 1)  # off the canvas: the preview goes
    assert not session.page.is_visible("#preview")


@pytest.mark.browser
def test_click_lists_neighbours_of_the_feature_space(session: Session, index: Path) -> None:
    for path in ("test/ring/0001.png", "train/arrow/0004.png"):
        session.page.mouse.click(*session.point(path))
        session.wait("__map.focus >= 0")
        shown = session.page.locator("#neighbours .path").all_text_contents()
        r = invoke("query", "--id", path, "--index", index, "-k", "5", "--json")
        assert r.exit_code == 0, r.output
        expected = [h["path"] for h in json.loads(r.stdout)["results"][0]["neighbours"]]
        assert shown == expected and len(shown) == 5
        assert path in session.page.text_content("#neighbours-of")


@pytest.mark.browser
def test_legend_toggles_a_class(session: Session) -> None:
    item = session.page.locator("#legend li", has_text="circle")
    n = session.js("__map.groupSize('circle')")
    assert n == 9
    session.redraw(item.click)
    assert session.js("__map.drawn") == 74 - n and "off" in item.get_attribute("class")
    session.redraw(item.click)
    assert session.js("__map.drawn") == 74


@pytest.mark.browser
def test_lasso_selects_the_points_inside_and_lists_their_paths(session: Session) -> None:
    pos = np.array(session.js("Array.from({length: __map.shown}, (_, i) => __map.screenPos(i))"))
    paths = session.js("Array.from({length: __map.shown}, (_, i) => __map.pathOf(i))")
    lo, hi = np.percentile(pos, 20, axis=0), np.percentile(pos, 70, axis=0)
    corners = [(lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1])]
    m = session.page.mouse
    session.page.keyboard.down("Shift")
    m.move(*corners[0])
    m.down()
    for c in (*corners[1:], corners[0]):
        m.move(*c, steps=8)
    m.up()
    session.page.keyboard.up("Shift")
    inside = ((pos > lo + 1) & (pos < hi - 1)).all(1)
    edge = ((pos > lo - 1) & (pos < hi + 1)).all(1) & ~inside  # within a pixel of the outline: either way
    got = set(session.page.input_value("#selection-paths").splitlines())
    assert (
        {paths[i] for i in np.flatnonzero(inside)} <= got <= {paths[i] for i in np.flatnonzero(inside | edge)}
    )
    assert inside.sum() >= 10 and session.page.text_content("#selection-count") == f"{len(got)} selected"


@pytest.mark.browser
def test_screenshot_is_not_blank(session: Session) -> None:
    shot = np.asarray(Image.open(io.BytesIO(session.page.locator("#map").screenshot())).convert("RGB"))
    assert shot.shape[0] > 300 and shot.shape[1] > 300
    assert shot.astype(np.float64).var() > 200  # a uniform canvas has ~0
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 1000  # thumbnails, not flat dots


@pytest.mark.browser
def test_pan_and_zoom_move_the_view(session: Session) -> None:
    x, y = session.point("train/cross/0002.png")
    session.page.mouse.move(x, y)
    session.redraw(lambda: session.page.mouse.wheel(0, -600))  # zoom in around the cursor
    x2, y2 = session.point("train/cross/0002.png")
    assert abs(x2 - x) < 2 and abs(y2 - y) < 2  # the point under the cursor stays put
    assert session.js("__map.drawn") < 74
    session.page.mouse.move(x2, y2)
    session.page.mouse.down()
    session.redraw(lambda: session.page.mouse.move(x2 + 120, y2 + 40, steps=5))
    session.page.mouse.up()
    x3, y3 = session.point("train/cross/0002.png")
    assert abs(x3 - x2 - 120) < 2 and abs(y3 - y2 - 40) < 2
    session.redraw(lambda: session.page.keyboard.press("f"))
    assert session.js("__map.drawn") == 74
    assert max(session.js("__map.frameTimes")) < 50


@pytest.mark.browser
def test_malicious_file_name_does_not_execute(session: Session, browser, page_file: Path) -> None:
    # Hover and click it, list it as a neighbour and as a search result: all as text.
    session.page.mouse.move(*session.point(EVIL))
    assert session.page.text_content("#preview-path") == EVIL
    assert session.page.text_content("#preview-label").startswith(EVIL_LABEL)
    session.page.mouse.click(*session.point(EVIL))
    session.wait("__map.focus >= 0")
    assert EVIL in session.page.text_content("#neighbours-of")
    session.page.fill("#search", "script")
    session.page.press("#search", "Enter")
    assert session.page.locator("#search-results .path").all_text_contents() == [EVIL]
    session.page.fill("#search", "onerror")
    session.page.press("#search", "Enter")
    assert session.page.locator("#search-results .path").all_text_contents() == [f"{EVIL_DIR}/x.png"]
    assert session.page.locator("#legend .name", has_text=EVIL_DIR).count() == 1
    assert session.dialogs == [] and session.page.locator("#map-data ~ img").count() == 0
    # Escaping must hold without the Content-Security-Policy too (a browser may ignore a meta CSP).
    bare = page_file.with_name("no-csp.html")
    bare.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page_file.read_text()))
    s2 = Session(browser, bare)
    s2.page.mouse.click(*s2.point(EVIL))
    s2.page.fill("#search", "<")
    s2.page.press("#search", "Enter")
    assert s2.js("document.querySelectorAll('img, iframe, object, embed').length") == 0
    assert s2.dialogs == [] and s2.errors == [] and s2.blocked == []
    s2.page.close()


# ----------------------------------------------------------------------------------------------
# What a newcomer meets on the page (issue #21)


def test_labels_and_groups_are_in_natural_order() -> None:
    labels = ["c10", "c2", "c1", "c2", "C3"]
    page = MapPage(
        coords=np.zeros((5, 2)),
        paths=[f"{i}.png" for i in range(5)],
        labels=labels,
        ids=np.arange(5),
        neighbours=np.full((5, 1), -1),
        distances=np.zeros((5, 1)),
        thumb_size=32,
        total=5,
    )
    d = page_payload(page)
    assert d["labelNames"] == ["c1", "c2", "C3", "c10"] == d["groupNames"]


@pytest.mark.browser
def test_class_frames_are_visible_at_the_default_zoom(session: Session) -> None:
    # 1-px frames at the default zoom left the legend matching nothing visible.
    frame, side = session.js("__map.frameSide"), session.js("__map.thumbSide")
    assert frame >= 3
    shot = np.asarray(Image.open(io.BytesIO(session.page.screenshot())).convert("RGB")).astype(int)
    seen = 0
    for i in range(40):
        x, y = session.js(f"__map.screenPos({i})")
        px = shot[round(y), round(x - side / 2 - frame / 2)]
        seen += int(np.abs(px - np.array(session.js(f"__map.colorOf({i})"))).max() <= 40)
    assert seen >= 20, seen  # neighbours overlapping a frame may hide it: most are visible


@pytest.mark.browser
def test_legend_is_reachable_from_the_keyboard(session: Session) -> None:
    items = session.page.locator("#legend li")
    assert items.count() >= 2 and items.first.get_attribute("tabindex") == "0"
    assert session.page.text_content("#legend-title") == "Classes"
    items.first.focus()
    session.redraw(lambda: session.page.keyboard.press("Enter"))
    assert items.first.get_attribute("aria-pressed") == "false" and "off" in items.first.get_attribute(
        "class"
    )
    session.redraw(lambda: session.page.keyboard.press(" "))
    assert items.first.get_attribute("aria-pressed") == "true"


@pytest.mark.browser
def test_a_search_without_a_match_leaves_the_map_as_it_was(session: Session) -> None:
    before = session.page.locator("#map").screenshot()
    session.page.fill("#search", "no-such-file-anywhere")
    session.page.press("#search", "Enter")
    session.wait("document.getElementById('search-count').textContent === 'no match'")
    assert session.page.locator("#map").screenshot() == before


@pytest.mark.browser
def test_clicked_image_links_its_original_file(session: Session, index: Path) -> None:
    path = "train/heart/0003.png"
    session.page.mouse.click(*session.point(path))
    session.wait("__map.focus >= 0")
    href = session.page.get_attribute("#open-original", "href")
    assert href == (open_index(index).root / path).as_uri()
    assert session.page.is_visible("#open-original")


@pytest.mark.browser
def test_open_original_names_the_file_under_an_awkward_root(browser, samples: Path, tmp_path: Path) -> None:
    # The root was pasted raw into a file:// URL: "#" began a fragment and "%41" decoded to "A".
    root = tmp_path / "odd #1 %41 dir"
    for src in sorted((samples / "train" / "heart").glob("*.png"))[:6]:
        (root / "h").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "h" / src.name)
    out = tmp_path / "idx"
    assert invoke("index", root, "--index", out, "--backbone", "pixels", "--workers", "0").exit_code == 0
    page = tmp_path / "m.html"
    r = invoke("map", out, "--out", page, "--method", "pca", "-k", "2")
    assert r.exit_code == 0, r.output
    s = Session(browser, page)
    try:
        path = "h/" + sorted(f.name for f in (root / "h").iterdir())[0]
        s.page.mouse.click(*s.point(path))
        s.wait("__map.focus >= 0")
        href = s.page.get_attribute("#open-original", "href")
        target = Path(urllib.parse.unquote(urllib.parse.urlparse(href).path))
        assert target == root / path and target.is_file(), href
    finally:
        s.page.close()


@pytest.mark.browser
def test_a_page_moved_away_from_its_images_keeps_the_thumbnail_preview(
    browser, page_file: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "elsewhere.html"
    text = page_file.read_text()
    root = json.loads(re.search(r'"rootUrl":\s*("[^"]*")', text).group(1))
    moved.write_text(text.replace(root, "file:///no/such/folder/"))
    s = Session(browser, moved)
    try:
        s.page.mouse.move(*s.point("train/heart/0003.png"))
        s.wait("__map.previewSource === 'thumbnail'")
        time.sleep(0.3)  # the failed load has come back by now
        assert s.js("__map.previewSource") == "thumbnail" and not s.errors
    finally:
        s.page.close()


@pytest.mark.browser
def test_the_toolbar_is_one_row_at_1400_px(browser, page_file: Path) -> None:
    s = Session(browser, page_file)
    try:
        s.page.set_viewport_size({"width": 1400, "height": 800})
        tops = s.js(
            "[...document.querySelectorAll('#bar > *')].filter(e => e.offsetParent).map(e => e.offsetTop)"
        )
        bar = s.js("document.getElementById('bar').offsetHeight")
        assert bar < 50 and max(tops) - min(tops) < 20, (bar, tops)
        s.page.set_viewport_size({"width": 1000, "height": 800})
        assert s.js("document.getElementById('bar').offsetHeight") < 50
    finally:
        s.page.close()


@pytest.mark.browser
def test_a_hundred_classes_get_colours_that_can_be_told_apart(browser, tmp_path: Path) -> None:
    # 101 classes: the old palette had 63 pairs of colours closer than 20 RGB units.
    import math

    from retrieval.maps import render_map

    n = 101
    rng = np.random.default_rng(0)
    page = MapPage(
        coords=rng.normal(size=(n, 2)),
        paths=[f"c{i}/0.png" for i in range(n)],
        labels=[f"c{i}" for i in range(n)],
        ids=np.arange(n),
        neighbours=np.full((n, 1), -1),
        distances=np.zeros((n, 1)),
        thumb_size=32,
        total=n,
    )
    render_map(tmp_path / "m.html", page, [])
    tab = browser.new_page()
    try:
        tab.goto((tmp_path / "m.html").as_uri())
        end = time.monotonic() + 20
        while not tab.evaluate("!!window.__map"):
            assert time.monotonic() < end
            time.sleep(0.05)
        colours = [tuple(c) for c in tab.evaluate(f"[...Array({n}).keys()].map(i => __map.colorOf(i))")]
    finally:
        tab.close()
    assert len(set(colours)) == n
    close = sum(math.dist(a, b) < 20 for a, b in itertools.combinations(colours, 2))
    assert close <= 5, close
