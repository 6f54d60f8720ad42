"""The seams the core was re-founded on (issue #13): the Searcher, the runner's stages, the VectorIndex,
the typed Manifest, one index vocabulary on the command line, and settings named as flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.index_folder import build_index
from retrieval.api import open_index
from retrieval.cli import app
from retrieval.config import IndexConfig
from retrieval.errors import RetrieveError

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _folder(root: Path, per_class: int = 4) -> Path:
    for c, colour in enumerate([(220, 20, 20), (20, 220, 20), (20, 20, 220)]):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(10 * c + i)
            arr = np.clip(np.array(colour) + rng.normal(0, 20, (28, 28, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def pixel_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("seams")
    build_index(IndexConfig(images=_folder(tmp / "db"), index=tmp / "idx", backbone="pixels", workers=0))
    return tmp / "idx"


@pytest.fixture()
def queries_with_a_bad_file(tmp_path: Path) -> Path:
    q = _folder(tmp_path / "queries", per_class=2)
    (q / "c1" / "empty.png").write_bytes(b"")
    return q


# -- the Searcher: a bad query costs that query only -------------------------------------------------


def test_the_searcher_answers_each_query_or_says_why_not(pixel_index: Path, tmp_path: Path) -> None:
    from retrieval.query import Searcher

    idx = open_index(pixel_index)
    good = idx.root / idx.paths[4]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    vectors = np.asarray(idx.vectors()[[7]])
    results = Searcher(idx).query(
        files=[good, tmp_path / "bad.png"], ids=[idx.paths[2], "nope.png"], vectors=vectors, k=3
    )
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert "not an image" in results[1].error and "not in the index" in results[3].error
    # Each answer equals the same query asked alone (the oracle: the primitives).
    assert results[0].hits == idx.search_paths([good], k=3)[0]
    assert results[2].hits == idx.search_ids([idx.paths[2]], k=3)[0]
    assert results[4].hits == idx.search_vectors(vectors, k=3)[0]
    assert results[0].hits[0].path == idx.paths[4]


def test_neighbours_draws_the_sheet_and_lists_a_bad_query(
    pixel_index: Path, queries_with_a_bad_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sheet.html"
    r = invoke("neighbours", pixel_index, "--queries", queries_with_a_bad_file, "-n", "6", "--out", out)
    assert r.exit_code == 0, r.output
    assert out.exists() and out.with_suffix(".png").exists()
    assert "skipped query" in r.output and "empty.png" in r.output and "empty file (0 bytes)" in r.output
    page = out.read_text()
    assert "c1/0.png" in page and "empty.png" not in page


def test_eval_scores_the_good_queries_and_lists_the_bad_one(
    pixel_index: Path, queries_with_a_bad_file: Path
) -> None:
    r = invoke("eval", pixel_index, "--queries", queries_with_a_bad_file, "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["spaces"][0]["queries"] == 6
    assert payload["skipped_queries"] == [{"path": "c1/empty.png", "reason": "empty file (0 bytes)"}]
    from retrieval.evaluate import embed_query_folder, evaluate_indexes

    idx = open_index(pixel_index)
    qs = embed_query_folder(idx, queries_with_a_bad_file)
    assert len(qs.paths) == 6 and qs.skipped == [("c1/empty.png", "empty file (0 bytes)")]
    lib = evaluate_indexes([idx], [qs], ks=(1, 5, 10))[0]
    assert payload["spaces"][0]["metrics"] == pytest.approx(lib.metrics)


# -- one index vocabulary ------------------------------------------------------------------------------


def test_every_index_reading_command_takes_dash_dash_index(pixel_index: Path, tmp_path: Path) -> None:
    positional, option = (
        invoke("info", pixel_index, "--json"),
        invoke("info", "--index", pixel_index, "--json"),
    )
    assert positional.exit_code == option.exit_code == 0, option.output
    assert json.loads(positional.stdout) == json.loads(option.stdout)
    a = invoke("eval", pixel_index, pixel_index, "--json")
    b = invoke("eval", "-i", pixel_index, "-i", pixel_index, "--json")
    assert a.exit_code == b.exit_code == 0 and json.loads(a.stdout) == json.loads(b.stdout)
    r = invoke("map", "--index", pixel_index, "--method", "pca", "--out", tmp_path / "m.html")
    assert r.exit_code == 0 and (tmp_path / "m.html").exists(), r.output
    r = invoke("neighbours", "-i", pixel_index, "-n", "2", "--out", tmp_path / "s.html")
    assert r.exit_code == 0 and (tmp_path / "s.html").exists(), r.output
    r = invoke("query", "--id", "c0/0.png", "--index", pixel_index, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["results"][0]["neighbours"], r.output
    r = invoke("info", pixel_index, "--index", tmp_path / "other")
    assert r.exit_code == 2 and "Two indexes given" in r.output


# -- settings are named, the CLI shows flags -----------------------------------------------------------


def test_errors_name_settings_and_the_cli_shows_flags(tmp_path: Path) -> None:
    from retrieval.training import TrainConfig

    with pytest.raises(RetrieveError) as caught:
        TrainConfig(data="d", out="o", image_size=4)
    assert str(caught.value) == "image_size must be at least 8." and "--" not in str(caught.value)
    assert caught.value.for_cli() == "--image-size must be at least 8."
    _folder(tmp_path / "d")
    r = invoke("train", tmp_path / "d", "--out", tmp_path / "run", "--image-size", "4")
    assert r.exit_code == 2 and "--image-size must be at least 8" in r.output and "«" not in r.output


# -- the runner's stages -------------------------------------------------------------------------------


class _MeanColour:
    """A mapper: the mean colour of each decoded image (no model)."""

    def __init__(self) -> None:
        from retrieval.images import PILDecoder, Transform
        from retrieval.preprocess import Preprocess

        self.transform = Transform(Preprocess(size=16, resize=16, squash=True))
        self.decoder = PILDecoder()

    def __call__(self, batch) -> np.ndarray:
        return batch.images.float().mean(dim=(2, 3)).numpy()


class _Collect:
    def __init__(self) -> None:
        self.rows: dict[str, np.ndarray] = {}
        self.skipped: list[str] = []
        self.closed = False

    def write(self, batch, vectors: np.ndarray) -> None:
        for row, v in zip(batch.rows, vectors, strict=True):
            self.rows[row["path"]] = v
        self.skipped += [r["path"] for r in batch.skipped]

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("workers", [0, 2])
def test_the_runner_maps_every_entry_once_and_ledgers_the_bad(tmp_path: Path, workers: int) -> None:
    from pipelines.runner import Settings, StageTimer, run
    from retrieval.images import open_image, scan

    root = _folder(tmp_path / "imgs")
    (root / "c0" / "broken.png").write_bytes(b"\x89PNG broken")
    entries, _ = scan(root)
    writer, timer = _Collect(), StageTimer()
    n = run(entries, _MeanColour, writer, Settings(batch_size=3, workers=workers), timer=timer)
    assert n == 12 and writer.closed and writer.skipped == ["c0/broken.png"]
    assert set(writer.rows) == {e.relpath for e in entries} - {"c0/broken.png"}
    for e in entries[:3]:  # the oracle: decoding by hand
        if e.relpath in writer.rows:
            img = np.asarray(open_image(e.path).resize((16, 16), Image.Resampling.BILINEAR), np.float32)
            np.testing.assert_allclose(writer.rows[e.relpath], img.mean(axis=(0, 1)), atol=1.5)
    assert {"load model", "read", "map", "write"} <= set(timer.seconds)
    with pytest.raises(RetrieveError, match="Unknown engine 'spark'"):
        run(entries, _MeanColour, writer, Settings(batch_size=3, workers=0), engine="spark")


# -- the VectorIndex seam and the typed manifest -------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_an_index_grown_by_add_equals_one_fitted_at_once_and_brute_force(metric: str) -> None:
    from retrieval.index import ExactIndex, normalize_rows

    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(7, 16)).astype(np.float32)
    grown = ExactIndex(metric=metric)
    for block in np.array_split(x, 4):
        grown.add(block)
    whole = ExactIndex(metric=metric).fit(x)
    d1, i1 = grown.search(q, 5)
    d2, i2 = whole.search(q, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2)
    if metric == "l2":
        brute = np.linalg.norm(x[None] - q[:, None], axis=2)
    else:
        brute = 1 - normalize_rows(q) @ normalize_rows(x).T
    np.testing.assert_array_equal(i1, np.argsort(brute, axis=1, kind="stable")[:, :5])
    assert grown.record() == {"type": "exact", "faiss": "IndexFlatL2" if metric == "l2" else "IndexFlatIP"}
    with pytest.raises(RetrieveError, match="dims"):
        grown.add(np.zeros((1, 3), np.float32))


def test_the_manifest_reads_what_older_versions_wrote(pixel_index: Path, tmp_path: Path) -> None:
    from retrieval.store import Manifest

    written = json.loads((pixel_index / "manifest.json").read_text())
    m = Manifest.from_dict(written)
    assert m.to_dict() == written  # a round trip keeps every field and their order
    assert list(m.to_dict()) == list(written)
    # A manifest from before tta, dtype and search_index were recorded means what those runs did.
    old = {k: v for k, v in written.items() if k not in ("tta", "dtype", "search_index", "committed")}
    o = Manifest.from_dict(old)
    assert (o.tta, o.dtype, o.search_index) == (False, "auto", {"type": "exact"})
    assert m.run_key() == {
        "layout": 2,
        **{
            k: written[k]
            for k in ("root", "backbone", "layer", "weights", "preprocess", "dim", "tta", "dtype")
        },
    }
