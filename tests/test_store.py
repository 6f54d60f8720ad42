"""Atomic, resumable index builds: interrupted runs keep the old index and the next run finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.index_folder import Progress, build_index
from retrieval.api import open_index
from retrieval.config import IndexConfig
from retrieval.samples import SampleConfig, make_samples
from retrieval.store import STAGING


class _InterruptAfter(Progress):
    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def advance(self, n: int) -> None:
        self.seen += n
        if self.seen >= self.n:
            raise KeyboardInterrupt


def _cfg(images: Path, index: Path, **kw) -> IndexConfig:
    return IndexConfig(
        images=images, index=index, backbone="lenet", workers=0, batch_size=4, shard_rows=8, **kw
    )


def test_interrupted_run_resumes_and_equals_a_clean_build(tmp_path: Path, samples: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        build_index(_cfg(samples, tmp_path / "idx"), progress=_InterruptAfter(30))
    assert not (tmp_path / "idx" / "manifest.json").exists()
    assert len(list((tmp_path / "idx" / STAGING).glob("shard-*.parquet"))) >= 3
    resumed = build_index(_cfg(samples, tmp_path / "idx"))
    n_files = 8 * 9
    assert resumed.indexed == n_files and 0 < resumed.embedded <= n_files - 24
    clean = build_index(_cfg(samples, tmp_path / "clean"))
    a, b = open_index(tmp_path / "idx"), open_index(tmp_path / "clean")
    assert a.paths == b.paths
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=1e-5)
    assert clean.embedded == n_files
    assert not (tmp_path / "idx" / STAGING).exists()


def test_staging_from_other_settings_is_discarded(tmp_path: Path, samples: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        build_index(_cfg(samples, tmp_path / "idx"), progress=_InterruptAfter(20))
    report = build_index(
        IndexConfig(images=samples, index=tmp_path / "idx", backbone="pixels", workers=0, shard_rows=8)
    )
    assert report.embedded == report.indexed == 72
    assert open_index(tmp_path / "idx").manifest.backbone == "pixels"


def test_changed_file_is_re_embedded_and_removed_file_dropped(tmp_path: Path) -> None:
    imgs = make_samples(
        tmp_path / "imgs", SampleConfig(per_class=3, test_per_class=0, size=32, classes=("circle", "star"))
    )
    build_index(_cfg(imgs, tmp_path / "idx"), progress=None)
    with pytest.raises(KeyboardInterrupt):
        build_index(_cfg(imgs, tmp_path / "idx"), progress=_InterruptAfter(4))
    (imgs / "train" / "star" / "0000.png").unlink()
    os.utime(imgs / "train" / "circle" / "0001.png", (1, 1))
    report = build_index(_cfg(imgs, tmp_path / "idx"))
    idx = open_index(tmp_path / "idx")
    assert report.indexed == 5 and "train/star/0000.png" not in idx.paths
    assert idx.manifest.generation == "gen-000002"
    assert [p.name for p in (tmp_path / "idx").glob("gen-*")] == ["gen-000002"]


def test_killed_process_leaves_previous_index_readable_and_rerun_completes(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    make_samples(imgs, SampleConfig(per_class=1, test_per_class=0, size=32))
    index = tmp_path / "idx"
    cmd = [
        sys.executable,
        "-m",
        "retrieval",
        "index",
        str(imgs),
        "--index",
        str(index),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--shard-rows",
        "2",
        "--dtype",
        "float32",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    before = open_index(index)
    assert len(before) == 8
    make_samples(imgs, SampleConfig(per_class=5, test_per_class=0, size=32))  # 32 more images
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = index / STAGING
    deadline = time.time() + 240
    while time.time() < deadline and len(list(staging.glob("shard-*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(staging.glob("shard-*.parquet"))) >= 3, "the run ended before it could be killed"
    after_kill = open_index(index)
    assert len(after_kill) == 8 and after_kill.manifest.generation == before.manifest.generation
    np.testing.assert_array_equal(after_kill.vectors(), before.vectors())
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert "resuming" in out.stderr
    final = open_index(index)
    assert len(final) == 40
    hits = final.search_ids(["train/star/0004.png"], k=1, exclude_self=False)[0]
    assert hits[0].path == "train/star/0004.png" and hits[0].distance < 1e-4


def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path) -> None:
    """mkstemp's 0600 must not leak into pages and indexes meant to be shared."""
    from retrieval.atomic import atomic_write

    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    written = atomic_write(tmp_path / "atomic", lambda fh: fh.write(b"x"))
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
