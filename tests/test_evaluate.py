"""Metrics against hand-computed cases and a slow numpy brute force; `retrieve eval` and `neighbours` via the CLI."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval import evaluate as ev
from retrieval.cli import app
from retrieval.errors import RetrieveError
from retrieval.evaluate import metrics as ev_metrics
from retrieval.evaluate import neighbours as ev_neighbours
from retrieval.evaluate import spaces as ev_spaces
from retrieval.index import ExactIndex, drop_self

# --------------------------------------------------------------------------------------------
# Hand-computed cases


def test_ranked_list_metrics_by_hand() -> None:
    rel = np.array([[True, False, True, False]])
    r = np.array([2])
    assert ev.precision_at_k(rel, 1)[0] == 1.0
    assert ev.precision_at_k(rel, 2)[0] == 0.5
    assert ev.recall_at_k(rel, r, 2)[0] == 0.5
    assert ev.recall_at_k(rel, r, 3)[0] == 1.0
    assert ev.r_precision(rel, r)[0] == 0.5
    assert ev.map_at_r(rel, r)[0] == 0.5  # (P(1)*1 + P(2)*0) / 2
    assert ev.average_precision(rel)[0] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError):
        ev.map_at_r(rel[:, :1], r)  # too shallow for R = 2


def _expected_ap_by_enumeration(d: np.ndarray, rel: np.ndarray) -> float:
    """AP averaged over every order of each group of tied distances (exact, for tiny lists)."""
    import itertools

    groups = [np.flatnonzero(d == v).tolist() for v in np.unique(d)]
    total, count = 0.0, 0
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        hits, s = 0, 0.0
        for rank, i in enumerate((i for g in perms for i in g), 1):
            if rel[i]:
                hits += 1
                s += hits / rank
        total, count = total + s / rel.sum(), count + 1
    return total / count


def test_whole_ranking_ap_is_its_expectation_over_tie_orders() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 8))
        d = rng.integers(0, 3, n).astype(np.float32)  # few values: many ties, across relevance
        rel = rng.random(n) < 0.5
        rel[0] = True
        got = ev_metrics._ap_from_sorted(
            np.sort(d[rel])[None], d[~rel][None], np.ones((1, int((~rel).sum())), bool)
        )
        assert got[0] == pytest.approx(_expected_ap_by_enumeration(d, rel), abs=1e-12)


def test_a_collapsed_embedding_scores_chance_not_perfect_map() -> None:
    # Every image mapped to one point: no ranking at all. A random order of n items, R relevant,
    # has expected AP sum_j P(relevant at j) E[precision at j | relevant] / R (checked on a small
    # case by enumeration); each query here ranks 19 others, 9 relevant.
    def chance(n: int, r: int) -> float:
        return sum((r / n) * (1 + (j - 1) * (r - 1) / (n - 1)) / j for j in range(1, n + 1)) / r

    assert _expected_ap_by_enumeration(np.zeros(6, np.float32), np.arange(6) < 3) == pytest.approx(
        chance(6, 3)
    )
    x = np.zeros((20, 4), np.float32)
    m = ev.evaluate_vectors(x, ["a"] * 10 + ["b"] * 10, ks=(1,), full_map=True).metrics
    assert m["mAP"] == pytest.approx(chance(19, 9)) and m["mAP"] < 0.6


def test_knn_majority_and_ties_by_hand() -> None:
    codes = np.array([[1, 2, 2, 1, 0]])
    assert ev.knn_accuracy(codes, np.array([1]), 1)[0] == 1.0
    assert ev.knn_accuracy(codes, np.array([1]), 3)[0] == 0.0  # 2 wins 2:1
    assert ev.knn_accuracy(codes, np.array([1]), 4)[0] == 1.0  # 2:2 tie goes to the nearest, 1
    assert ev.knn_accuracy(np.array([[-1, 3, -1]]), np.array([3]), 3)[0] == 1.0  # missing never vote


def test_recall_vs_exact_and_drop_self() -> None:
    assert ev.recall_vs_exact(np.array([[0, 1, 5]]), np.array([[0, 1, 2]]), 3) == pytest.approx(2 / 3)
    assert ev.recall_vs_exact(np.array([[2, 1, 0]]), np.array([[0, 1, 2]]), 3) == 1.0
    # Row 0 finds itself second (a duplicate came first); row 1 does not find itself at all.
    dist = np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 3.0]])
    ids = np.array([[4, 0, 7], [5, 6, 8]])
    i, d = drop_self(ids, dist, np.array([0, 1]), 2)
    assert i.tolist() == [[4, 7], [5, 6]]
    assert d.tolist() == [[0.0, 1.0], [0.0, 2.0]]


def test_whole_evaluation_on_a_line_by_hand() -> None:
    # Points on a line; hand-ranked in the module's docstring conventions (see comments per query).
    x = np.array([[0.0], [1.0], [10.0], [11.0], [12.5]], np.float32)
    labels = ["a", "a", "b", "a", "b"]
    res = ev.evaluate_vectors(x, labels, ks=(1, 3), full_map=True)
    m = res.metrics
    # q0: a b a b (R=2)  q1: a b a b (R=2)  q2: a b a a (R=1)  q3: b b a a (R=2)  q4: a b a a (R=1)
    assert m["P@1"] == pytest.approx(0.4)
    assert m["R@1"] == pytest.approx((0.5 + 0.5) / 5)
    assert m["R-precision"] == pytest.approx(0.2)
    assert m["MAP@R"] == pytest.approx(0.2)
    assert m["mAP"] == pytest.approx((5 / 6 + 5 / 6 + 1 / 2 + (1 / 3 + 2 / 4) / 2 + 1 / 2) / 5)
    assert m["kNN@3"] == pytest.approx(0.4)
    assert res.mode == "leave-one-out" and res.n_queries == 5


# --------------------------------------------------------------------------------------------
# Oracle: a slow, obvious numpy reference on random data


def _brute_force(db, db_labels, queries, query_labels, ks, cosine=False):
    db64, q64 = db.astype(np.float64), (db if queries is None else queries).astype(np.float64)
    if cosine:
        db64 = db64 / np.linalg.norm(db64, axis=1, keepdims=True)
        q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    qlab = db_labels if queries is None else query_labels
    rows: dict[str, list[float]] = {}
    knn: dict[int, list[float]] = {k: [] for k in ks}
    for qi in range(len(q64)):
        d = ((db64 - q64[qi]) ** 2).sum(axis=1)
        order = [int(j) for j in np.argsort(d, kind="stable") if queries is not None or j != qi]
        rel = [db_labels[j] == qlab[qi] for j in order]
        n_rel = sum(rel)
        for k in ks:
            top = [db_labels[j] for j in order[:k]]
            counts = {lab: top.count(lab) for lab in top}
            best = max(counts.values())
            pred = next(lab for lab in top if counts[lab] == best)
            knn[k].append(float(pred == qlab[qi]))
        if n_rel == 0:
            continue
        for k in ks:
            rows.setdefault(f"P@{k}", []).append(sum(rel[:k]) / k)
            rows.setdefault(f"R@{k}", []).append(sum(rel[:k]) / n_rel)
        rows.setdefault("R-precision", []).append(sum(rel[:n_rel]) / n_rel)
        hits, s_r, s_all = 0, 0.0, 0.0
        for i, r in enumerate(rel, start=1):
            if r:
                hits += 1
                s_all += hits / i
                if i <= n_rel:
                    s_r += hits / i
        rows.setdefault("MAP@R", []).append(s_r / n_rel)
        rows.setdefault("mAP", []).append(s_all / n_rel)
    out = {name: float(np.mean(v)) for name, v in rows.items()}
    out.update({f"kNN@{k}": float(np.mean(v)) for k, v in knn.items()})
    return out


@pytest.mark.parametrize("mode", ["leave-one-out", "queries", "cosine"])
def test_metrics_equal_numpy_brute_force(mode: str) -> None:
    rng = np.random.default_rng(7)
    n, d, ks = 300, 64, (1, 4, 15)
    # Unbalanced classes whose centres overlap: every metric lands well inside (0, 1).
    classes = rng.choice(6, size=n, p=[0.35, 0.25, 0.15, 0.1, 0.1, 0.05])
    centres = rng.normal(0, 1.0, (6, d))
    db = (centres[classes] + rng.normal(0, 5.0, (n, d))).astype(np.float32)
    db_labels = [f"c{c}" for c in classes]
    queries = query_labels = None
    if mode == "queries":
        qc = rng.choice(7, size=90)  # class 6 is absent from the database
        queries = (centres[np.minimum(qc, 5)] + rng.normal(0, 5.0, (90, d))).astype(np.float32)
        query_labels = [f"c{c}" for c in qc]
    cosine = mode == "cosine"
    res = ev.evaluate_vectors(
        db, db_labels, queries, query_labels, ks=ks, metric="cosine" if cosine else "l2", full_map=True
    )
    expected = _brute_force(db, db_labels, queries, query_labels, ks, cosine)
    assert set(res.metrics) == set(expected)
    for name, value in expected.items():
        # FAISS ranks by float32 distances, the oracle by float64: a near-tie may swap two neighbours,
        # which moves a mean by ~1e-6. Any error in a definition (R off by one, AP normalised by the
        # hits instead of R, the query not left out) moves it by more than 1e-3.
        assert res.metrics[name] == pytest.approx(value, abs=1e-4), name
        assert 0.0 < value < 1.0
    if mode == "queries":
        assert res.n_queries < res.n_queries_total and res.notes


def test_blocked_search_matches_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    labels = [str(c) for c in rng.integers(0, 3, 300)]
    whole = ev.evaluate_vectors(x, labels, ks=(1, 5), full_map=True).metrics
    monkeypatch.setattr(ev_neighbours, "_BLOCK_CELLS", 500)  # a handful of queries per block
    calls = {"search": 0, "ap": 0}
    search, ap = ExactIndex.search, ev_neighbours._ap_from_sorted

    def counted_search(self: ExactIndex, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        calls["search"] += 1
        return search(self, *args, **kwargs)

    def counted_ap(*args: np.ndarray) -> np.ndarray:
        calls["ap"] += 1
        return ap(*args)

    monkeypatch.setattr(ExactIndex, "search", counted_search)
    monkeypatch.setattr(ev_neighbours, "_ap_from_sorted", counted_ap)
    assert ev.evaluate_vectors(x, labels, ks=(1, 5), full_map=True).metrics == pytest.approx(whole)
    # The patch reached both blocked loops (unpatched: one search, one distance block per class).
    assert calls["search"] > 1 and calls["ap"] > 3


def test_full_map_skipped_above_the_pair_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    monkeypatch.setattr(ev_spaces, "FULL_MAP_MAX_PAIRS", 100)
    res = ev.evaluate_vectors(x, ["a", "b"] * 25, ks=(1,))
    assert "mAP" not in res.metrics and "MAP@R" in res.metrics
    assert any("skipped" in n for n in res.notes)


def test_best_per_metric_marks_ties() -> None:
    a = ev.SpaceResult("a", "queries", 1, 1, 1, {"P@1": 0.5, "MAP@R": 0.2})
    b = ev.SpaceResult("b", "queries", 1, 1, 1, {"P@1": 0.5, "MAP@R": 0.3})
    assert ev.best_per_metric([a, b]) == {"P@1": [0, 1], "MAP@R": [1]}


# --------------------------------------------------------------------------------------------
# Indexes on disk and the CLI


def _images(root: Path, names: dict[str, int], seed: int = 0) -> Path:
    """Class folders of small flat-colour images: the class sets the colour, so pixels separate them."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for label, n in names.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.array(colours[label]) + rng.integers(-40, 40, 3)
            arr = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


def _index(images: Path, out: Path, backbone: str = "pixels") -> Path:
    from pipelines.index_folder import build_index
    from retrieval.config import IndexConfig

    build_index(IndexConfig(images=images, index=out, backbone=backbone, device="cpu", workers=0))
    return out


@pytest.fixture(scope="module")
def spaces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("spaces")
    db = _images(tmp / "db", {"red": 8, "green": 8, "blue": 8})
    queries = _images(tmp / "queries", {"red": 3, "green": 3, "blue": 3}, seed=1)
    evil = queries / "red" / "<img src=x onerror=alert(1)>.png"
    (queries / "red" / "0.png").rename(evil)
    return {
        "db": db,
        "queries": queries,
        "pixels": _index(db, tmp / "idx-pixels"),
        "lenet": _index(db, tmp / "idx-lenet", "lenet"),
        "other": _index(_images(tmp / "other", {"red": 8, "green": 7, "blue": 8}), tmp / "idx-other"),
    }


def test_eval_cli_json_matches_the_library(spaces: dict[str, Path]) -> None:
    from retrieval.api import open_index

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(spaces["pixels"]), str(spaces["lenet"]), "-k", "1,3", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    rows = {r["space"]: r for r in payload["spaces"]}
    assert set(rows) == {"idx-pixels", "idx-lenet"}
    idx = open_index(spaces["pixels"])
    lib = ev.evaluate_vectors(np.asarray(idx.vectors()), idx.labels, ks=(1, 3), full_map=True)
    assert rows["idx-pixels"]["metrics"] == pytest.approx(lib.metrics)
    assert rows["idx-pixels"]["mode"] == "leave-one-out"
    # Flat colours: pixel space separates the classes perfectly.
    assert rows["idx-pixels"]["metrics"]["P@3"] == 1.0
    assert set(payload["best"]["P@1"]) <= {"idx-pixels", "idx-lenet"}


def test_eval_cli_queries_table_and_csv(spaces: dict[str, Path]) -> None:
    runner = CliRunner()
    args = ["eval", str(spaces["pixels"]), str(spaces["lenet"]), "--queries", str(spaces["queries"])]
    res = runner.invoke(app, [*args, "-k", "1,5"])
    assert res.exit_code == 0, res.output
    assert "idx-pixels" in res.stdout and "MAP@R" in res.stdout and "*" in res.stdout
    res = runner.invoke(app, [*args, "--csv"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("space,mode,database,queries") and len(lines) == 3
    assert lines[1].split(",")[1] == "queries"


@pytest.mark.parametrize("columns", [80, 100, 240])
def test_eval_table_fits_the_terminal_and_shows_every_number_whole(
    spaces: dict[str, Path], columns: int
) -> None:
    # At 80 columns rich used to squeeze every cell of the 12-metric table to `0.…`.
    args = ["eval", str(spaces["pixels"]), str(spaces["lenet"])]
    runner = CliRunner()
    payload = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    res = runner.invoke(app, args, env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "…" not in res.stdout
    header_cells = [c.strip() for line in lines if "space" in line for c in line.split("┃") if c.strip()]
    names = [n for n in header_cells if n not in ("space", "dim")]
    assert sorted(names) == sorted(payload["spaces"][0]["metrics"])  # every metric, once
    assert names[:2] == ["P@10", "MAP@R"]  # the most telling first
    for row in payload["spaces"]:
        shown = [line for line in lines if line.startswith("│ " + row["space"])]
        numbers = [c.strip().rstrip("*") for line in shown for c in line.split("│")[3:] if c.strip()]
        assert numbers == [f"{row['metrics'][n]:.3f}" for n in names]
    assert (len([line for line in lines if "(continued)" in line]) > 0) == (columns < 200)


def test_eval_refuses_spaces_over_different_images(spaces: dict[str, Path]) -> None:
    res = CliRunner().invoke(app, ["eval", str(spaces["pixels"]), str(spaces["other"])])
    assert res.exit_code == 2
    assert "do not cover the same images" in res.output and "green/7.png" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(RetrieveError):
        from retrieval.api import open_index

        ev.check_same_images([open_index(spaces["pixels"]), open_index(spaces["other"])])


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.titles: list[str] = []
        self.imgs = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("img", "meta", "br", "wbr", "link"):  # void elements
            self.stack.append(tag)
        if tag == "img":
            self.imgs += 1
            src = dict(attrs).get("src") or ""
            assert src.startswith("data:image/"), src[:40]  # self-contained: no file references
        if "onerror" in dict(attrs):
            raise AssertionError("an attribute from a file name became markup")

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_neighbours_sheet_is_valid_escaped_html_with_every_query(
    spaces: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sheet.html"
    res = CliRunner().invoke(
        app,
        [
            "neighbours",
            str(spaces["pixels"]),
            str(spaces["lenet"]),
            "--queries",
            str(spaces["queries"]),
            "-n",
            "9",
            "-k",
            "4",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    html = out.read_text()
    parser = _Collect()
    parser.feed(html)
    parser.close()
    assert parser.stack == []
    text = "".join(parser.text)
    query_files = sorted(
        p.relative_to(spaces["queries"]).as_posix() for p in spaces["queries"].rglob("*.png")
    )
    assert len(query_files) == 9
    for q in query_files:
        assert q in text, q
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    # 9 queries x 2 spaces x (query + 4 neighbours)
    assert parser.imgs == 9 * 2 * 5
    png = Image.open(out.with_suffix(".png"))
    assert png.width > 200 and png.height > 200


def test_eval_real_subprocess(spaces: dict[str, Path]) -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "retrieval", "eval", str(spaces["pixels"]), "-k", "2", "--csv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    header, row = res.stdout.strip().splitlines()
    assert header.split(",")[4:] == ["P@2", "R@2", "R-precision", "MAP@R", "mAP", "kNN@2"]
    assert row.startswith("idx-pixels,leave-one-out,24,24,")


def test_eval_without_index_uses_the_last_one(
    spaces: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrieval.cli._indexes import remember_last_index

    monkeypatch.setenv("RETRIEVE_STATE_DIR", str(tmp_path / "state"))
    res = CliRunner().invoke(app, ["eval", "--json"])
    assert res.exit_code == 2 and "No index given" in res.output
    remember_last_index(spaces["lenet"])
    res = CliRunner().invoke(app, ["eval", "--json", "-k", "1"])
    assert res.exit_code == 0, res.output
    assert [r["space"] for r in json.loads(res.stdout)["spaces"]] == ["idx-lenet"]


def test_neighbours_sheet_leave_one_out_never_shows_the_query_as_its_own_neighbour(
    spaces: dict[str, Path], tmp_path: Path
) -> None:
    from retrieval.api import open_index
    from retrieval.sheet import neighbour_blocks

    idx = [open_index(spaces["pixels"]), open_index(spaces["lenet"])]
    blocks = neighbour_blocks(idx, None, None, n=6, k=3)
    assert len(blocks) == 6 and len({b.query.label for b in blocks}) == 3  # spread over the labels
    for block in blocks:
        for row in block.rows:
            assert len(row.neighbours) == 3
            assert block.query.name not in [c.name for c in row.neighbours]
            assert [c.distance for c in row.neighbours] == sorted(c.distance for c in row.neighbours)
            assert all(c.wrong == (c.label != block.query.label) for c in row.neighbours)
    out = tmp_path / "loo.html"
    res = CliRunner().invoke(
        app, ["neighbours", str(spaces["pixels"]), "-n", "2", "-k", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    parser = _Collect()
    parser.feed(out.read_text())
    assert parser.imgs == 2 * 1 * 3


def test_sheet_queries_spread_over_labels_by_seed_not_text_order() -> None:
    from collections import Counter

    from retrieval.sheet import pick_queries

    labels = [f"c{i}" for i in range(1, 18) for _ in range(6)]  # 17 classes: c1, c10..c16 sort first
    seen: Counter[str] = Counter()
    for seed in range(60):
        picked = pick_queries(labels, 8, seed)
        assert picked == pick_queries(labels, 8, seed)  # seeded
        shown = [labels[i] for i in picked]
        assert len(set(shown)) == 8 and len(set(picked)) == 8
        seen.update(shown)
    # Every class is shown, about equally often (60 x 8 / 17 = 28 each).
    assert set(seen) == set(labels) and min(seen.values()) >= 12 and max(seen.values()) <= 48
    # More queries than classes: every class once before any class twice.
    counts = Counter(labels[i] for i in pick_queries(labels, 20, 3))
    assert set(counts) == set(labels) and max(counts.values()) == 2
    # A class with fewer images gives its turns to the others.
    uneven = ["a"] + ["b"] * 9
    assert (
        sorted(labels_[0] for labels_ in (uneven[i] for i in pick_queries(uneven, 6, 0))) == ["a"] + ["b"] * 5
    )


def test_sheet_distances_share_one_format() -> None:
    from retrieval.sheet import distance_format

    fmt = distance_format([9.46, 10.1, 14.0])
    assert [fmt.format(v) for v in (9.46, 10.1, 14.0)] == ["9.5", "10.1", "14.0"]
    assert distance_format([0.01234, 0.5]).format(0.01234) == "0.012"
    assert distance_format([123.4]).format(123.4) == "123"
    assert distance_format([]).format(0.0) == "0.000"
    assert distance_format([1.2e-7, 3e-8]).format(1.2e-7) == "0.0000"  # near-duplicates, not 9 decimals


def test_sheet_rows_of_same_named_folders_are_told_apart(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from retrieval.sheet import _space_names
    from retrieval.store.manifest import WeightsRecord

    def idx(path: Path, backbone: str = "lenet") -> SimpleNamespace:
        m = SimpleNamespace(backbone=backbone, weights=WeightsRecord("none", "random-init(seed=0)", ""))
        return SimpleNamespace(manifest=m, path=path)

    a, b, c = tmp_path / "a" / "idx", tmp_path / "b" / "idx", tmp_path / "c"
    names = _space_names([idx(a), idx(b), idx(c), idx(c, "pixels")])
    assert len(set(names)) == 4 and names[3] == "pixels"
    assert names[0] == f"lenet · random weights ({a})" and names[2] == "lenet · random weights (c)"


def test_sheet_rows_name_the_space_and_the_png_stands_alone(spaces: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sheet.html"
    args = [
        "neighbours",
        str(spaces["pixels"]),
        str(spaces["lenet"]),
        "-n",
        "3",
        "-k",
        "4",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    page = out.read_text()
    # Rows are the spaces (backbone and weights), not the index folders' names.
    assert '<div class="space">pixels<br>' in page and '<div class="space">lenet · random weights<br>' in page
    assert '<div class="space">idx-' not in page
    # Every distance printed with the decimals of the largest one.
    import re

    rows = re.findall(r'<div class="row">(.*?)</div>\n(?=<div class="row">|</section>)', page, re.S)
    assert len(rows) == 3 * 2
    for row in rows:
        shown = re.findall(r"d = ([0-9.]+)", row)
        assert len(shown) == 4 and len({len(d.split(".")[-1]) if "." in d else 0 for d in shown}) == 1
    # The PNG carries the legend under its title and a "same label" count per row: ink where the
    # old PNG had white between the title and the first query.
    from retrieval.sheet import LEGEND, render_png

    png = np.asarray(Image.open(out.with_suffix(".png")).convert("L"))
    legend_band = png[28:42, 6:400]
    assert (legend_band < 128).mean() > 0.02 and "red outline" in LEGEND
    assert render_png([], "t").height < png.shape[0]


# -- hand-computed cases for what a mutation run found unguarded --------------------------------


def test_count_tied_counts_queries_with_equal_distances_in_their_first_k_plus_one() -> None:
    from retrieval.evaluate import metrics as m

    d = np.array(
        [
            [0.1, 0.2, 0.3, 0.3],  # tie at ranks 3-4: inside k + 1 = 4 for k = 3, outside for k = 2
            [0.1, 0.1, 0.5, 0.6],  # tie at ranks 1-2
            [0.1, 0.2, np.inf, np.inf],  # missing neighbours: not a tie
            [0.4, 0.5, 0.6, 0.7],
        ]
    )
    assert m.count_tied(d, 3) == 2 and m.count_tied(d, 2) == 1 and m.count_tied(d, 1) == 1
    assert m.count_tied(d[2:], 3) == 0


def test_per_query_ap_and_r_metrics_with_one_relevant_item() -> None:
    from retrieval.evaluate import metrics as m

    rel = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
    # Query 0 has a single relevant item, at rank 2: AP 1/2, recall@2 1, R-precision 0, MAP@R 0.
    n_rel = np.array([1, 3, 0])
    np.testing.assert_allclose(m.average_precision(rel, n_rel), [1 / 2, (1 + 2 / 3) / 3, 0.0])
    np.testing.assert_allclose(m.average_precision(rel), [1 / 2, (1 + 2 / 3) / 2, 0.0])  # n_rel from rel
    np.testing.assert_allclose(m.recall_at_k(rel, n_rel, 2), [1.0, 1 / 3, 0.0])
    np.testing.assert_allclose(m.r_precision(rel, np.array([1, 3, 1])), [0.0, 2 / 3, 0.0])
    rel1 = np.array([[1, 0, 0, 0], [0, 1, 1, 1]], bool)
    np.testing.assert_allclose(m.r_precision(rel1, np.array([1, 1])), [1.0, 0.0])
    np.testing.assert_allclose(m.map_at_r(rel1, np.array([1, 1])), [1.0, 0.0])
    with pytest.raises(ValueError, match="need 5 neighbours per query for R-based metrics, got 4"):
        m.map_at_r(rel, np.array([5, 1, 1]))


def test_knn_ignores_missing_neighbours_and_means_skip_queries_without_relevant_items() -> None:
    from retrieval.evaluate import metrics as m

    codes = np.array([[1, -1, -1], [-1, -1, 1], [2, 1, 1]])
    np.testing.assert_allclose(m.knn_accuracy(codes, np.array([1, 1, 1]), 3), [1.0, 1.0, 1.0])
    # ranked_metrics marks missing neighbours (-1 ids) so that they never vote for class 1.
    db = np.array([0, 1, 1])
    out = m.ranked_metrics(np.array([[2, -1, -1]]), np.array([0]), np.array([1]), db, [3])
    assert out["kNN@3"].tolist() == [0.0]
    out = m.ranked_metrics(np.array([[0, -1, -1]]), np.array([1]), np.array([1]), np.array([0, 1, 2]), [3])
    assert out["kNN@3"].tolist() == [0.0]
    per = {"P@1": np.array([1.0, 0.0]), "kNN@1": np.array([1.0, 0.0])}
    means = m.mean_over_queries(per, ["P@1", "kNN@1"], np.array([False, False]))
    assert np.isnan(means["P@1"]) and means["kNN@1"] == 0.5
    assert m.recall_vs_exact(np.array([[4]]), np.array([[4]]), 1) == 1.0


def test_a_long_space_name_splits_before_its_weights_on_the_png() -> None:
    from retrieval.sheet import name_lines

    # Cut at the front, "efficientnet_lite0 · ImageNet" became "…icientnet_lite0 · ImageNet".
    def narrow(t: str) -> bool:
        return len(t) <= 20

    assert name_lines("efficientnet_lite0 · ImageNet", narrow) == ["efficientnet_lite0", "· ImageNet"]
    assert name_lines("lenet · best.pt", narrow) == ["lenet · best.pt"]
    assert name_lines("a_very_long_pixel_space_name", narrow) == ["a_very_long_pixel_space_name"]
