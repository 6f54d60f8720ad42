"""How far an approximate index updated in place can drift before it should be trained again (#16).

    python bench/drift.py [--n 200000] [--d 128]

Clustered vectors (as `bench/ann.py` makes them) from one set of cluster centres train the index
the measured choice picks, at its operating point for recall@10 >= 0.95. Then a fraction of the
vectors is replaced by vectors from new centres (new content: the folder's subject changed), the
index is updated in place by id (remove + add, the lists and codes left as trained), and recall@10
is measured at the same operating point on 1,000 held-out rows of the new data, beside an index
trained afresh on it. A sync trains a new index once more than `retrieval.index.update.DRIFT` of
the vectors changed; this says what each fraction costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.config import SearchConfig
from retrieval.index import ArrayRows, FactoryIndex, build_search_index
from retrieval.index.tune import ground_truth, query_ids, recall_at
from retrieval.index.update import DRIFT


def clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray, lift: np.ndarray) -> np.ndarray:
    z = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, centres.shape[1]), np.float32)
    return (np.maximum(z @ lift, 0) + 0.05 * rng.standard_normal((n, d), np.float32)).astype(np.float32)


def recall(index: FactoryIndex, x: np.ndarray) -> float:
    rows = ArrayRows(x)
    truth = ground_truth(rows, "l2", query_ids(len(x), 1000, seed=7))
    index.attach(rows)
    return recall_at(index, truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    args = ap.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    latent = 32
    lift = (rng.standard_normal((latent, args.d)) / np.sqrt(latent)).astype(np.float32)
    old_c = 2.0 * rng.standard_normal((1000, latent)).astype(np.float32)
    new_c = 2.0 * rng.standard_normal((1000, latent)).astype(np.float32)
    x = clustered(rng, args.n, args.d, old_c, lift)
    t = time.perf_counter()
    trained = build_search_index(ArrayRows(x), "l2", SearchConfig(search="approximate", min_recall=0.95))
    print(
        f"{os.cpu_count()} cores; {args.n:,} x {args.d}: {trained.factory} at {trained.params}, "
        f"recall@10 {trained.tuning_['recall_at_10']:.4f} (built in {time.perf_counter() - t:.0f} s)"
    )
    blob = faiss.serialize_index(trained.index_)
    print(f"{'replaced':>9} {'in place':>9} {'retrained':>10}  (sync retrains past {DRIFT:.0%})")
    for frac in (0.05, 0.1, 0.2, 0.4, 0.8):
        m = int(frac * args.n)
        y = x.copy()
        swap = np.sort(np.random.default_rng(1).choice(args.n, m, replace=False))
        y[swap] = clustered(np.random.default_rng(2), m, args.d, new_c, lift)
        updated = FactoryIndex(factory=trained.factory, metric="l2", params=dict(trained.params))
        updated.index_, updated.d_ = faiss.deserialize_index(blob), args.d
        updated.remove(swap)
        updated.add(y[swap], swap)
        fresh = build_search_index(ArrayRows(y), "l2", SearchConfig(search=trained.factory))
        fresh.set_params(**trained.params)
        print(f"{frac:>9.0%} {recall(updated, y):>9.4f} {recall(fresh, y):>10.4f}", flush=True)


if __name__ == "__main__":
    main()
