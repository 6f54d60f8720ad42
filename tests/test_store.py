"""Atomic, resumable index builds: interrupted runs keep the old index and the next run finishes."""

from __future__ import annotations

import dataclasses
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
from retrieval.errors import RetrieveError
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
    with pytest.raises(KeyboardInterrupt):  # a rebuild: a sync of the same folder has nothing to do
        build_index(_cfg(imgs, tmp_path / "idx", rebuild=True), progress=_InterruptAfter(4))
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


def test_staging_flushes_by_time_as_well_as_by_count(tmp_path: Path) -> None:
    from retrieval.store import Staging

    now = [0.0]
    staging = Staging(tmp_path, {"k": 1}, shard_rows=4096, flush_seconds=30.0, clock=lambda: now[0])
    staging.open()
    row = {"path": "a.png", "label": "a", "bytes": 1, "mtime": 0.0, "ctime": 0.0}

    def add(i: int) -> None:
        staging.add(np.full((1, 3), i, np.float32), [{**row, "path": f"{i}.png"}], [])

    for i in range(3):
        add(i)
        now[0] += 10.0 - 1e-6  # under 30 s in all: nothing written yet
    assert staging.shards() == []
    now[0] += 1.0
    add(3)  # 31 s since the start: the four rows go to disk
    assert len(staging.shards()) == 1
    assert len(Staging(tmp_path, {"k": 1}, shard_rows=4096).open()) == 4
    add(4)  # the clock restarted at that flush
    assert len(staging.shards()) == 1


def test_a_kill_loses_at_most_flush_seconds_of_work(tmp_path: Path, samples: Path) -> None:
    # Shards of 4,096 used to be the only unit of progress: an interrupted run of fewer images
    # kept nothing. With a shard due every batch, 7 of 8 batches survive the interrupt.
    cfg = _cfg(samples, tmp_path / "idx", flush_seconds=1e-9)
    cfg = IndexConfig(**{**cfg.__dict__, "shard_rows": 4096})
    with pytest.raises(KeyboardInterrupt):
        build_index(cfg, progress=_InterruptAfter(32))
    resumed = build_index(cfg)
    assert resumed.indexed == 72 and resumed.embedded <= 72 - 28
    with pytest.raises(RetrieveError, match="flush_seconds"):
        IndexConfig(images=samples, index=tmp_path / "x", flush_seconds=0)


def _full_disk_case(tmp_path: Path, samples: Path) -> tuple[IndexConfig, np.ndarray]:
    cfg = IndexConfig(images=samples, index=tmp_path / "idx", backbone="pixels", workers=0)
    build_index(cfg)
    return cfg, np.asarray(open_index(tmp_path / "idx").vectors()).copy()


def _still_intact(tmp_path: Path, before: np.ndarray) -> None:
    idx = open_index(tmp_path / "idx")
    assert idx.manifest.generation == "gen-000001"
    np.testing.assert_array_equal(idx.vectors(), before)


def test_a_build_that_cannot_fit_is_refused_before_any_work(
    tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from retrieval.store import space

    cfg, before = _full_disk_case(tmp_path, samples)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage._replace(free=50_000))
    with pytest.raises(space.NoSpaceError) as err:
        build_index(dataclasses.replace(cfg, rebuild=True))
    text = str(err.value)
    needed = space.build_bytes(open_index(tmp_path / "idx").manifest.dim, 72, 72)  # pixels at 32 px: 3,072-d
    assert f"needs about {needed / 1e6:.1f} MB and 50.0 KB is free" in text
    assert "(gen-000001) is intact" in text and "index" in text and "«" not in text
    _still_intact(tmp_path, before)
    from typer.testing import CliRunner

    from retrieval.cli import app

    r = CliRunner().invoke(
        app, ["index", str(samples), "--index", str(tmp_path / "idx"), "--backbone", "pixels", "--rebuild"]
    )
    assert r.exit_code == 1 and "give --index a folder on a disk with more room" in " ".join(r.stderr.split())
    assert "Traceback" not in r.output


def test_a_first_build_refused_for_space_leaves_nothing_behind(
    tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from retrieval.store import space

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage._replace(free=50_000))
    cfg = IndexConfig(images=samples, index=tmp_path / "deep" / "idx", backbone="pixels", workers=0)
    with pytest.raises(space.NoSpaceError, match="no earlier index to lose"):
        build_index(cfg)
    assert not (tmp_path / "deep").exists()  # not even .staging/run.json


def test_a_disk_that_fills_during_the_build_is_said_plainly(
    tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retrieval.store import space, staging

    cfg, before = _full_disk_case(tmp_path, samples)

    def full(path: Path, array: np.ndarray) -> None:
        raise OSError("850944 requested and 624608 written")  # numpy's words for ENOSPC

    monkeypatch.setattr(staging, "write_npy", full)
    cfg = dataclasses.replace(cfg, rebuild=True)  # a sync of the same folder would write nothing
    with pytest.raises(space.NoSpaceError, match="ran out of space during this build") as err:
        build_index(cfg)
    assert "requested and" not in str(err.value) and "(gen-000001) is intact" in str(err.value)
    _still_intact(tmp_path, before)
    monkeypatch.undo()
    assert build_index(cfg).indexed == 72  # with room again, the same command succeeds


def test_a_failed_first_build_leaves_no_empty_folders(
    tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["index", str(samples), "--backbone", "no-such-net"])
    assert r.exit_code != 0 and "no-such-net" in r.output
    assert not (tmp_path / "indexes").exists()
