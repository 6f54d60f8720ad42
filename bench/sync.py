"""Incremental sync (#16): a no-op sync and a 1% churn against `--rebuild` of the same folder state.

    python bench/sync.py [--n 100000] [--backbone lenet] [--work /tmp/sync-bench]

Generates N small PNGs in class folders (once), builds the index, then measures in one run:
  - a no-op sync (stat only; target <= 10 s at 100k on 2 cores),
  - 1% churn (a quarter each: added, changed, deleted, renamed) synced, with its embedding stage
    split from the rest (target: total <= embedding of the changed files + 10 s, and the
    index-update part <= 5% of a full rebuild),
  - `--rebuild` of the same state, the baseline, and a check that both indexes hold the same paths.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.index_folder import build_index
from retrieval.api import open_index
from retrieval.config import IndexConfig, SearchConfig

CLASSES = 10


def _write(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
    noise = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(base + noise).save(path, compress_level=1)


def folder(work: Path, n: int) -> Path:
    root = work / f"images-{n}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        for c in range(CLASSES):
            (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            _write(root / f"c{i % CLASSES}" / f"{i:07d}.png", i)
        (root / ".complete").touch()
    return root


def churn(root: Path, n: int, fraction: float, seed: int = 1) -> dict[str, int]:
    """Add, change, delete and rename a quarter of `fraction` of the files each."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in root.rglob("*.png"))
    each = max(1, int(len(files) * fraction / 4))
    picked = rng.choice(len(files), 3 * each, replace=False)
    changed, deleted, renamed = (files[i] for i in picked[:each]), picked[each : 2 * each], picked[2 * each :]
    for p in changed:
        _write(p, int(rng.integers(1 << 30)))
    for i in deleted:
        files[i].unlink()
    for i in renamed:
        files[i].rename(files[i].with_name(f"moved-{files[i].name}"))
    for j in range(each):
        _write(root / f"c{j % CLASSES}" / f"added-{j:06d}.png", n + j)
    return {"added": each, "changed": each, "deleted": each, "renamed": each}


def timed(config: IndexConfig) -> tuple[float, object]:
    t = time.perf_counter()
    report = build_index(config)
    return time.perf_counter() - t, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--backbone", default="lenet")
    ap.add_argument("--search", default="auto", help="the index's --search (auto: approximate from 100k)")
    ap.add_argument(
        "--dtype", default="float32", help="auto: bf16 where the CPU has it (the default of index)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/sync-bench"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    root = folder(args.work, args.n)
    print(f"{os.cpu_count()} cores; {args.n:,} files ready in {time.perf_counter() - t:.0f} s", flush=True)
    # A working copy: the churn must not change the cached folder.
    live = args.work / "live"
    shutil.rmtree(live, ignore_errors=True)
    shutil.copytree(root, live, ignore=shutil.ignore_patterns(".complete"))
    weights = "none" if args.backbone != "pixels" else None
    common = {"backbone": args.backbone, "dtype": args.dtype, "search": SearchConfig(search=args.search)}
    if weights:
        common["weights"] = weights
    synced, rebuilt = args.work / "idx-sync", args.work / "idx-rebuild"
    for d in (synced, rebuilt):
        shutil.rmtree(d, ignore_errors=True)
    first, _ = timed(IndexConfig(images=live, index=synced, **common))
    print(f"first build: {first:.1f} s", flush=True)
    noop, report = timed(IndexConfig(images=live, index=synced, **common))
    print(f"no-op sync: {noop:.2f} s (embedded {report.embedded}; stages {report.stages})", flush=True)
    changes = churn(live, args.n, 0.01)
    sync_s, report = timed(IndexConfig(images=live, index=synced, **common))
    # Embedding the changed files: reading and decoding them, the model, writing their shard.
    model = sum(report.stages.get(k, 0.0) for k in ("read", "map", "write"))
    print(f"1% churn {changes}: sync {sync_s:.1f} s, embedded {report.embedded}; stages {report.stages}")
    rebuild_s, rb = timed(IndexConfig(images=live, index=rebuilt, rebuild=True, **common))
    print(f"--rebuild of the same state: {rebuild_s:.1f} s (embedded {rb.embedded}; stages {rb.stages})")
    a, b = open_index(synced), open_index(rebuilt)
    assert a.paths == b.paths, "the synced index differs from the rebuild"
    np.testing.assert_allclose(np.asarray(a.vectors()), np.asarray(b.vectors()), atol=1e-5)
    update = sync_s - model
    per_image = model / max(report.embedded, 1)
    print(
        f"\nno-op sync {noop:.2f} s (target <= 10 s); 1% churn {sync_s:.1f} s = embedding {model:.1f} s "
        f"({per_image * 1e3:.2f} ms an image) + the rest {update:.1f} s (target <= 10 s); the rest is "
        f"{update / rebuild_s:.1%} of the rebuild's {rebuild_s:.1f} s (target <= 5%); "
        f"rebuild / sync = {rebuild_s / sync_s:.1f}x"
    )


if __name__ == "__main__":
    main()
