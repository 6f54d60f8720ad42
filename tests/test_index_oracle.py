"""ExactIndex against numpy brute force on seeded, deliberately awkward data."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import RetrieveError
from retrieval.index import ExactIndex, normalize_rows


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        xn = x64 / np.maximum(np.linalg.norm(x64, axis=1, keepdims=True), 1e-300)
        qn = q64 / np.maximum(np.linalg.norm(q64, axis=1, keepdims=True), 1e-300)
        xn[np.linalg.norm(x64, axis=1) == 0] = 0
        d = 1.0 - qn @ xn.T
    else:
        d = np.sqrt(np.maximum(((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1), 0))
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def hard_data(seed: int, n: int = 700, d: int = 67) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Clusters at very different scales, exact duplicates, and a zero vector.
    centers = rng.normal(0, 1, (7, d)) * rng.choice([0.01, 1, 100], (7, 1))
    x = (centers[rng.integers(0, 7, n)] + rng.normal(0, 0.05, (n, d))).astype(np.float32)
    x[10:15] = x[3]
    x[20] = 0
    q = np.concatenate([x[:5], rng.normal(0, 1, (20, d)).astype(np.float32) * 10])
    return x, q


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_equals_brute_force(metric: str, seed: int) -> None:
    x, q = hard_data(seed)
    k = 9
    dist, ids = ExactIndex(metric=metric).fit(x).search(q, k)
    ref_d, ref_i = brute_force(x, q, k, metric)
    np.testing.assert_allclose(
        dist, ref_d, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(ref_d).max())) * 1e-2
    )
    # Ids may differ only where distances tie; the distance of each returned id must be right.
    if metric == "l2":
        true_d = np.linalg.norm(x[ids].astype(np.float64) - q[:, None, :].astype(np.float64), axis=2)
    else:
        xn, qn = normalize_rows(x).astype(np.float64), normalize_rows(q).astype(np.float64)
        true_d = 1 - np.einsum("qkd,qd->qk", xn[ids], qn)
    np.testing.assert_allclose(true_d, ref_d, rtol=1e-3, atol=1e-4)
    # Positions whose distance is clearly apart from both neighbours in the ranking are not ties.
    tol = 1e-4 * np.maximum(1.0, ref_d)
    padded = np.pad(ref_d, ((0, 0), (1, 1)), constant_values=np.inf)
    apart = (np.abs(padded[:, 1:-1] - padded[:, :-2]) > tol) & (np.abs(padded[:, 2:] - padded[:, 1:-1]) > tol)
    assert apart.sum() > 0.2 * apart.size  # the oracle must compare real rankings
    np.testing.assert_array_equal(ids[apart], ref_i[apart])


def test_blocks_equal_one_array_and_self_distance_zero() -> None:
    x, _ = hard_data(3)
    a = ExactIndex().fit(x)
    b = ExactIndex().fit(iter([x[:100], x[100:333], x[333:]]))
    q = x[::50]
    np.testing.assert_array_equal(a.search(q, 5)[1], b.search(q, 5)[1])
    d, _ = a.search(x[100:105], 1)
    assert np.all(d[:, 0] < 1e-3)


def test_k_larger_than_n_and_bad_input() -> None:
    x = np.eye(3, dtype=np.float32)
    d, i = ExactIndex().fit(x).search(x[:1], 5)
    assert list(i[0][:3]) == [0, 1, 2] or sorted(i[0][:3]) == [0, 1, 2]
    assert list(i[0][3:]) == [-1, -1] and np.isinf(d[0][3:]).all()
    with pytest.raises(RetrieveError, match="dims"):
        ExactIndex().fit(x).search(np.ones((1, 4), np.float32), 1)
    with pytest.raises(RetrieveError, match="metric"):
        ExactIndex(metric="manhattan").fit(x)


def test_save_load_roundtrip(tmp_path) -> None:
    x, q = hard_data(4)
    a = ExactIndex(metric="cosine").fit(x)
    a.save(tmp_path / "i.faiss")
    b = ExactIndex.load(tmp_path / "i.faiss", metric="cosine")
    np.testing.assert_array_equal(a.search(q, 4)[1], b.search(q, 4)[1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_distances_are_exact_for_large_norms_whatever_the_batch(metric: str) -> None:
    # FAISS's batched kernel (20+ queries) expands |x - y|^2 in float32: with norms near 500 the
    # query's own row came back at ~0.4 and near-duplicates off by tens of percent.
    rng = np.random.default_rng(0)
    db = (rng.random((300, 2048)) * 20).astype(np.float32)
    db[1] = db[0] + rng.normal(0, 0.002, 2048).astype(np.float32)  # a near-duplicate of row 0
    index = ExactIndex(metric=metric).fit(db)
    batched = index.search(db[:64], 5)
    single = index.search(db[:1], 5)
    x = normalize_rows(db).astype(np.float64) if metric == "cosine" else db.astype(np.float64)
    for d, ids in (batched, single):
        if metric == "l2":  # under cosine the near-duplicate ties with the query at float32 precision
            assert ids[0, 0] == 0 and d[0, 0] == 0.0
        if metric == "l2":
            truth = np.linalg.norm(x[ids[0]] - x[0], axis=1)
        else:
            truth = 1.0 - x[ids[0]] @ x[0]
        np.testing.assert_allclose(d[0], truth, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batched[0][:1], single[0])


def test_normalize_rows_gives_float32_unit_rows_and_keeps_zero_rows_zero() -> None:
    # Survivors of a mutation run: a float64 input stayed float64, and without `out=` the zero
    # rows of np.divide(where=...) are whatever memory held (not zero).
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.normal(size=(64, 8)) * 100  # float64 in
        x[::7] = 0.0
        y = normalize_rows(x)
        assert y.dtype == np.float32
        norms = np.linalg.norm(y.astype(np.float64), axis=1)
        np.testing.assert_allclose(norms[np.linalg.norm(x, axis=1) > 0], 1.0, rtol=1e-6)
        assert (y[::7] == 0).all()
        np.testing.assert_allclose(y[1], x[1] / np.linalg.norm(x[1]), rtol=1e-6)
    assert normalize_rows(np.array([[3, 4]])).tolist() == [[0.6000000238418579, 0.800000011920929]]


def test_index_kinds_register_once_and_the_manifest_record_picks_one(tmp_path) -> None:
    from retrieval.index import base
    from retrieval.index.base import load_index, register_kind

    with pytest.raises(RetrieveError, match="registered twice"):
        register_kind("exact", lambda path, metric, record, rows: ExactIndex(metric=metric))
    opened = []
    # A loader also gets the stored vectors (None here), which approximate kinds re-rank from.
    register_kind(
        "test-kind", lambda path, metric, record, rows: opened.append((path, metric, record, rows)) or "made"
    )
    try:
        record = {"type": "test-kind", "n": 3}
        assert load_index(tmp_path / "x", "cosine", record, "idx") == "made"
        assert opened == [(tmp_path / "x", "cosine", record, None)]
        with pytest.raises(RetrieveError, match="'nope' search index"):
            load_index(tmp_path / "x", "l2", {"type": "nope"}, "idx")
    finally:
        base._KINDS.pop("test-kind")


def test_drop_self_pads_short_rows_with_minus_one_and_infinity() -> None:
    from retrieval.index import drop_self

    # Row 0: itself first; row 1: itself absent (a duplicate ranked ahead), row 2: FAISS ran out
    # of neighbours (-1) and the row is padded, float64 distances in.
    ids = np.array([[5, 1, 2], [7, 8, 9], [3, -1, -1]])
    dist = np.array([[0.0, 1.0, 2.0], [0.5, 1.5, 2.5], [0.0, np.inf, np.inf]])
    out_ids, out_d = drop_self(ids, dist, np.array([5, 6, 3]), k=2)
    assert out_ids.tolist() == [[1, 2], [7, 8], [-1, -1]]
    assert out_d.dtype == np.float32
    assert out_d[:2].tolist() == [[1.0, 2.0], [0.5, 1.5]] and np.isposinf(out_d[2]).all()


def _brute(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    x, q = x.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        return np.sqrt(((q[:, None] - x[None]) ** 2).sum(-1))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return 1.0 - qn @ xn.T


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_unrefined_search_gives_true_distances_too(metric: str) -> None:
    # refine=False (eval's deep searches, the map's graph) converts FAISS's own numbers: squared
    # L2 to L2, inner product to 1 - cosine; ids FAISS ran out of (k > n) get infinity.
    rng = np.random.default_rng(3)
    x, q = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(7, 6)).astype(np.float32)
    q[0] = x[3] + 0.01  # a near-duplicate: squared distance far below 1
    dist, ids = ExactIndex(metric=metric).fit(x).search(q, 55, refine=False)
    assert dist.dtype == np.float32 and ids.dtype == np.int64
    full = _brute(x, q, metric)
    assert (ids[:, 50:] == -1).all() and np.isposinf(dist[:, 50:]).all()
    np.testing.assert_allclose(dist[:, :50], np.take_along_axis(full, ids[:, :50], 1), atol=2e-5)
    np.testing.assert_allclose(dist[:, :50], np.sort(full, axis=1), atol=2e-5)


def test_one_vector_index_and_ties_keep_faiss_order() -> None:
    one = ExactIndex().fit(np.ones((1, 4), np.float32))
    dist, ids = one.search(np.zeros((2, 4), np.float32), 3)
    assert ids.tolist() == [[0, -1, -1]] * 2 and dist[:, 0].tolist() == [2.0, 2.0]
    assert np.isposinf(dist[:, 1:]).all()
    # Three distinct rows repeated 30 times: distances tie in groups, and within a group the refined
    # order is FAISS's (by id), as a stable sort keeps it.
    rows = np.tile(np.array([[2, 0], [1, 0], [3, 0]], np.float32), (30, 1))
    same = ExactIndex().fit(rows)
    dist, refined = same.search(np.zeros((1, 2), np.float32), 90)
    assert dist.ravel().tolist() == [1.0] * 30 + [2.0] * 30 + [3.0] * 30
    assert refined.ravel().tolist() == list(range(1, 90, 3)) + list(range(0, 90, 3)) + list(range(2, 90, 3))


def test_add_without_fit_and_the_record_the_manifest_keeps() -> None:
    idx = ExactIndex(metric="cosine")
    idx.add(np.eye(3, dtype=np.float32))  # no fit first: the first block makes the index
    assert idx.ntotal == 3 and idx.search(np.eye(3, dtype=np.float32), 1)[1].ravel().tolist() == [0, 1, 2]
    assert idx.record() == {"type": "exact", "faiss": "IndexFlatIP"}
    assert ExactIndex().fit(np.eye(2, dtype=np.float32)).record() == {"type": "exact", "faiss": "IndexFlatL2"}
