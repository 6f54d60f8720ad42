"""Benchmark `retrieve map`: our t-SNE vs scikit-learn's default TSNE, UMAP at 100k, and the 100k page.

Hardware is printed in the header. Vectors are synthetic and clustered like CNN features: 60
clusters of uneven size in 512-d, each spread over its own 24-d subspace plus isotropic noise
(seeded). Parts, each a separate command so every locked run stays short:

  tsne   ours (retrieval.maps.project: PCA to 50, exact FAISS kNN, openTSNE FFT/BH, 125 + 375
         iterations, all cores) vs sklearn.manifold.TSNE() with its defaults on the raw vectors, side
         by side on the same data in this one run; quality of both on the same 3000-point subsample:
         10-NN preservation (share of each point's 10 nearest neighbours in 512-d that are among its
         10 nearest in 2-D), trustworthiness (k=10) and 10-NN cluster accuracy in 2-D.
  scale  ours only, at --n (e.g. 100k t-SNE, target < 10 min) and UMAP at --n (target < 5 min).
  page   render_map of --n points with generated 32 px thumbnails: HTML size, then in headless
         Chromium (network off): first paint, and frame times while panning and zooming.

    flock /tmp/cpu.lock python bench/map.py tsne --n 50000 [--sklearn-n 50000]
    flock /tmp/cpu.lock python bench/map.py scale --n 100000 --methods tsne,umap
    flock /tmp/cpu.lock python bench/map.py page --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from retrieval.device import machine_summary
from retrieval.maps import ProjectionParams, default_jobs, run_projection


def header() -> str:
    # The load average shows how much else ran: the lock only serialises runs that take it.
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"# {machine_summary()} | load average {load}"


def clustered(n: int, dim: int = 512, k: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n vectors in k uneven clusters with low intrinsic dimension: (float32 vectors, cluster ids)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 2.0))
    y = rng.choice(k, size=n, p=weights)
    centres = rng.normal(size=(k, dim)).astype(np.float32) * 1.6
    bases = rng.normal(size=(k, 24, dim)).astype(np.float32) / np.sqrt(24)
    x = np.empty((n, dim), np.float32)
    for c in range(k):
        idx = np.flatnonzero(y == c)
        z = rng.normal(size=(len(idx), 24)).astype(np.float32)
        x[idx] = centres[c] + z @ bases[c] + 0.35 * rng.normal(size=(len(idx), dim)).astype(np.float32)
    return np.maximum(x, 0), y  # post-ReLU features are non-negative


def knn(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(q, dtype=np.float32), k + 1)
    return ids[:, 1:]  # drop the query itself (no exact duplicates in this data)


def quality(x: np.ndarray, y: np.ndarray, emb: np.ndarray, sample: np.ndarray) -> dict[str, float]:
    """10-NN preservation over all points' neighbourhoods for `sample` queries, trustworthiness and
    10-NN label accuracy of 2-D on the sample."""
    from sklearn.manifold import trustworthiness

    hi = knn(x, x[sample], 10)
    lo = knn(emb, emb[sample], 10)
    keep = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hi, lo, strict=True)])
    acc = float(np.mean([np.mean(y[b] == y[s]) for s, b in zip(sample, lo, strict=True)]))
    tw = trustworthiness(x[sample], emb[sample], n_neighbors=10)
    return {"knn_kept": float(keep), "trust": float(tw), "knn_acc": acc}


def sklearn_tsne(x: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, random_state=0).fit_transform(x)  # its defaults: BH, 1000 iterations


def run_tsne(args: argparse.Namespace) -> list[dict]:
    rows = []
    x, y = clustered(args.n, args.dim)
    sample = np.random.default_rng(1).choice(args.n, size=min(3000, args.n), replace=False)
    t = time.perf_counter()
    ours = run_projection(x, ProjectionParams(method="tsne"), jobs=args.jobs).coords
    t_ours = time.perf_counter() - t
    q_ours = quality(x, y, ours, sample)
    rows.append({"part": "tsne", "impl": "ours", "n": args.n, "seconds": t_ours, **q_ours})
    print(f"ours      n={args.n:>7,}  {t_ours:8.1f} s  {json.dumps(q_ours)}", flush=True)
    if args.sklearn_n:
        m = args.sklearn_n
        xs, ys = (x, y) if m == args.n else clustered(m, args.dim)
        s = np.random.default_rng(1).choice(m, size=min(3000, m), replace=False)
        if m != args.n:  # ours at the same n too, so the ratio and the quality compare like with like
            t = time.perf_counter()
            emb = run_projection(xs, ProjectionParams(method="tsne"), jobs=args.jobs).coords
            t_ours_m = time.perf_counter() - t
            q = quality(xs, ys, emb, s)
            rows.append({"part": "tsne", "impl": "ours", "n": m, "seconds": t_ours_m, **q})
            print(f"ours      n={m:>7,}  {t_ours_m:8.1f} s  {json.dumps(q)}", flush=True)
        else:
            t_ours_m = t_ours
        # What the shortened schedule costs in quality: openTSNE's default 250 + 500 iterations.
        t = time.perf_counter()
        full = ProjectionParams(method="tsne", tsne_early_iters=250, tsne_iters=500)
        emb = run_projection(xs, full, jobs=args.jobs).coords
        t_full = time.perf_counter() - t
        q = quality(xs, ys, emb, s)
        rows.append({"part": "tsne", "impl": "ours, 250+500 iterations", "n": m, "seconds": t_full, **q})
        print(f"ours 750  n={m:>7,}  {t_full:8.1f} s  {json.dumps(q)}", flush=True)
        t = time.perf_counter()
        ref = sklearn_tsne(xs)
        t_ref = time.perf_counter() - t
        q_ref = quality(xs, ys, ref, s)
        rows.append({"part": "tsne", "impl": "sklearn TSNE()", "n": m, "seconds": t_ref, **q_ref})
        print(f"sklearn   n={m:>7,}  {t_ref:8.1f} s  {json.dumps(q_ref)}", flush=True)
        print(f"speed-up at n={m:,}: {t_ref / t_ours_m:.1f}x", flush=True)
    return rows


def run_scale(args: argparse.Namespace) -> list[dict]:
    rows = []
    x, y = clustered(args.n, args.dim)
    sample = np.random.default_rng(1).choice(args.n, size=min(3000, args.n), replace=False)
    for method in args.methods.split(","):
        t = time.perf_counter()
        emb = run_projection(x, ProjectionParams(method=method), jobs=args.jobs).coords
        sec = time.perf_counter() - t
        q = quality(x, y, emb, sample)
        rows.append({"part": "scale", "impl": method, "n": args.n, "seconds": sec, **q})
        print(f"{method:<6} n={args.n:>7,}  {sec:8.1f} s  {json.dumps(q)}", flush=True)
    return rows


def synthetic_thumbs(n: int, size: int, labels: np.ndarray):
    """Distinct little images: a label-coloured gradient with a moving square, as JPEG-able arrays."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        rng = np.random.default_rng(i)
        base = rng.uniform(40, 220, 3).astype(np.float32)
        img = base + 60 * np.stack([xx, yy, 1 - xx], -1) + ((labels[i] * 37) % 255) * 0.2
        a, b = rng.integers(0, size - size // 3, 2)
        img[a : a + size // 3, b : b + size // 3] = 255 - base
        yield np.clip(img, 0, 255).astype(np.uint8)


def run_page(args: argparse.Namespace) -> list[dict]:
    from playwright.sync_api import sync_playwright

    from retrieval.maps import MapPage, make_atlases, render_map

    n, k, size = args.n, 10, 32
    x, y = clustered(n, 64)
    coords = run_projection(x, ProjectionParams(method="pca")).coords  # layout only; timing is the page
    nb = knn(x, x, k)
    t = time.perf_counter()
    atlases = make_atlases(synthetic_thumbs(n, size, y), size)
    t_atlas = time.perf_counter() - t
    page = MapPage(
        coords=coords,
        paths=[f"class-{y[i]:02d}/img-{i:06d}.jpg" for i in range(n)],
        labels=[f"class-{v:02d}" for v in y],
        ids=np.arange(n),
        neighbours=nb,
        distances=np.ones((n, k), np.float32),
        thumb_size=size,
        total=n,
        title=f"bench {n:,}",
    )
    out = Path(tempfile.mkdtemp()) / "map.html"
    t = time.perf_counter()
    nbytes = render_map(out, page, atlases)
    t_html = time.perf_counter() - t
    print(
        f"page n={n:,}: {nbytes / 1e6:.1f} MB HTML ({len(atlases)} atlases; thumbnails {t_atlas:.1f} s, "
        f"html {t_html:.1f} s)",
        flush=True,
    )
    exe = os.environ.get("RETRIEVE_CHROMIUM") or shutil.which("chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe)
        pg = browser.new_page(viewport={"width": 1280, "height": 800})
        pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
        t = time.perf_counter()
        pg.goto(out.as_uri(), wait_until="commit")
        # First paint: the page's own first frame (performance.now() from navigation start), polled.
        while not pg.evaluate("!!(window.__map && __map.firstPaintMs !== null)"):
            time.sleep(0.02)
        first_paint = pg.evaluate("__map.firstPaintMs") / 1000
        wall_first = time.perf_counter() - t
        while not pg.evaluate("__map.atlasesLoaded === __map.atlases"):
            time.sleep(0.05)
        t_thumbs = time.perf_counter() - t
        drawn = pg.evaluate("__map.drawn")

        most_thumbs = [0]

        def frames(action) -> list[float]:
            before = pg.evaluate("__map.frames")
            action()
            while pg.evaluate("__map.frames") <= before:
                time.sleep(0.005)
            after = pg.evaluate("__map.frames")
            most_thumbs[0] = max(most_thumbs[0], pg.evaluate("__map.thumbsDrawn"))
            return pg.evaluate(f"__map.frameTimes.slice(-{after - before})")

        # Every animation frame's timestamp while we interact: a frame that takes long delays the next.
        pg.evaluate(
            "(() => { window.__raf = []; const loop = (t) => { __raf.push(t); requestAnimationFrame(loop); };"
            " requestAnimationFrame(loop); })()"
        )
        cx, cy = 500, 400
        pan: list[float] = []
        zoom: list[float] = []
        pg.mouse.move(cx, cy)
        for _ in range(2):
            for _ in range(6):  # zoom in step by step: from all dots to thumbnails
                zoom += frames(lambda: pg.mouse.wheel(0, -300))
            pg.mouse.down()
            for s in range(1, 21):
                pan += frames(lambda s=s: pg.mouse.move(cx + 12 * s, cy + 6 * s))
            pg.mouse.up()
            for _ in range(6):
                zoom += frames(lambda: pg.mouse.wheel(0, 300))
            pg.mouse.down()
            for s in range(1, 21):
                pan += frames(lambda s=s: pg.mouse.move(cx + 240 - 12 * s, cy + 120 - 6 * s))
            pg.mouse.up()
        raf = np.diff(np.asarray(pg.evaluate("__raf"), dtype=np.float64))
        paint = pg.evaluate(
            "(performance.getEntriesByName('first-contentful-paint')[0] || {startTime: null}).startTime"
        )
        browser.close()
    shutil.rmtree(out.parent, ignore_errors=True)
    row = {
        "part": "page",
        "n": n,
        "html_mb": nbytes / 1e6,
        "first_paint_s": first_paint,
        "first_paint_wall_s": wall_first,
        "thumbnails_loaded_s": t_thumbs,
        "drawn": drawn,
        "most_thumbnails_in_a_frame": most_thumbs[0],
        "first_contentful_paint_s": paint / 1000 if paint is not None else None,
        "raf_interval_ms_median": float(np.median(raf)),
        "raf_interval_ms_p95": float(np.percentile(raf, 95)),
        "raf_interval_ms_max": float(raf.max()),
        "pan_ms_median": statistics.median(pan),
        "pan_ms_max": max(pan),
        "zoom_ms_median": statistics.median(zoom),
        "zoom_ms_max": max(zoom),
    }
    print(json.dumps(row, indent=1), flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["tsne", "scale", "page"])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--sklearn-n", type=int, default=None, help="run sklearn's TSNE at this n (0: skip)")
    ap.add_argument("--methods", default="tsne,umap")
    ap.add_argument("--jobs", type=int, default=None, help=f"default: all cores ({default_jobs()})")
    ap.add_argument("--json", type=Path, default=None, help="append the rows to this JSON-lines file")
    args = ap.parse_args()
    if args.sklearn_n is None:
        args.sklearn_n = args.n
    print(header(), flush=True)
    rows = {"tsne": run_tsne, "scale": run_scale, "page": run_page}[args.part](args)
    if args.json:
        with args.json.open("a") as fh:
            for r in rows:
                fh.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **r}) + "\n")


if __name__ == "__main__":
    main()
