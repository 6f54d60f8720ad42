"""A file that crashes the C decoder kills its loader process: the run skips that file with a reason
and finishes, instead of dying there on every re-run."""

from __future__ import annotations

import functools
import multiprocessing.util
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import pipelines.index_folder
from pipelines.index_folder import Progress, build_index
from retrieval.api import open_index
from retrieval.cli import app
from retrieval.config import IndexConfig
from retrieval.errors import BadImageError, RetrieveError
from retrieval.images import IsolationPolicy, PILDecoder, Transform, scan

# decode_all forks its processes on Linux only; elsewhere each one imports torch again (seconds
# per restart), too slow for a test that makes a process die file after file.
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="decode_all forks its decoding processes on Linux only"
)

# The limits of the hang test: a stall is found in seconds, not minutes.
QUICK = IsolationPolicy(stall_min_s=2.0, stall_per_file_s=0.25, poll_s=0.5, file_timeout_s=1.0)


@dataclass(frozen=True)
class _Hostile:
    """PILDecoder, except that a file named boom* segfaults the loader process decoding it (and
    leaves a file in `log` for each crash).

    With `marker`, the first file decoded in a loader process kills it once, whatever it is (a
    process lost to something other than a file: the OOM killer, say), and nothing after that.
    A module-level dataclass: it reaches the decoding processes by fork, and would by pickle.
    """

    marker: Path | None = None
    log: Path | None = None
    test_process: int = field(default_factory=os.getpid)
    name: str = "hostile"

    def decode(self, path: str | os.PathLike, transform: Transform) -> tuple[torch.Tensor, int, int]:
        in_loader = os.getpid() != self.test_process  # a DataLoader worker or an isolation process
        if self.marker is not None and in_loader and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.marker is None and Path(path).name.startswith("boom"):
            if not in_loader:  # never take the test process down
                raise BadImageError("would have crashed this process")
            if self.log is not None:
                (self.log / f"{Path(path).name}.{os.getpid()}").touch()
            os.kill(os.getpid(), signal.SIGSEGV)
        if Path(path).name.startswith("hang") and in_loader:
            once = Path(path).with_suffix(".hung")
            if not Path(path).name.startswith("hangonce") or not once.exists():
                once.touch()
                time.sleep(3600)  # a decoder stuck in a loop (hangonce*: only the first time)
        if Path(path).name.startswith("oops") and in_loader:
            raise KeyError("a bug in decoding, not a bad file")
        return PILDecoder().decode(path, transform)


@dataclass(frozen=True)
class _OOMKilled:
    """PILDecoder, except that every decoding process is killed at its first file."""

    test_process: int = field(default_factory=os.getpid)
    name: str = "oom-killed"

    def decode(self, path: str | os.PathLike, transform: Transform) -> tuple[torch.Tensor, int, int]:
        if os.getpid() != self.test_process:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does, file after file
        return PILDecoder().decode(path, transform)


@dataclass(frozen=True)
class _KilledOnceEach:
    """PILDecoder, except that the process decoding one of `names` is killed, once per name
    (a `killed-<name>` file in `marks` remembers it)."""

    marks: Path
    names: frozenset[str]
    test_process: int = field(default_factory=os.getpid)
    name: str = "killed-once-each"

    def decode(self, path: str | os.PathLike, transform: Transform) -> tuple[torch.Tensor, int, int]:
        mark = self.marks / f"killed-{Path(path).name}"
        if os.getpid() != self.test_process and Path(path).name in self.names and not mark.exists():
            mark.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return PILDecoder().decode(path, transform)


def _folder(root: Path, n: int = 23) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            root / f"c{i % 2}" / f"{i:02d}.png"
        )
    return root


class _Warnings(Progress):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _pixels(
    images: Path,
    index: Path,
    progress: Progress | None = None,
    decoder: _Hostile | _OOMKilled | _KilledOnceEach | None = None,
    policy: IsolationPolicy | None = None,
    **kw,
):
    config = IndexConfig(images=images, index=index, backbone="pixels", **kw)
    return build_index(config, progress, decoder=decoder, policy=policy)


@pytest.mark.parametrize("workers", [1, 2])
def test_files_that_crash_the_decoder_are_skipped_and_the_rest_indexed(tmp_path: Path, workers: int) -> None:
    clean = _folder(tmp_path / "clean")
    _pixels(clean, tmp_path / "oracle", workers=0)
    hostile = tmp_path / "hostile"
    shutil.copytree(clean, hostile)
    # Valid PNGs: only the hostile decoder makes them crash. One early, one late in the scan order.
    shutil.copy(clean / "c0" / "00.png", hostile / "c0" / "boom-early.png")
    shutil.copy(clean / "c1" / "21.png", hostile / "c1" / "zz-late.png")
    shutil.copy(clean / "c1" / "21.png", hostile / "c1" / "boom-late.png")

    progress = _Warnings()
    report = _pixels(hostile, tmp_path / "idx", progress, _Hostile(), workers=workers, batch_size=4)

    got, want = open_index(tmp_path / "idx"), open_index(tmp_path / "oracle")
    assert sorted(r["path"] for r in got.skipped()) == ["c0/boom-early.png", "c1/boom-late.png"]
    assert all("crashed the image decoder" in r["reason"] for r in got.skipped())
    assert report.skipped_reasons == {"crashed the image decoder": 2}
    # Every other file is indexed exactly once, with the vector a crash-free run gives it.
    assert [p for p in got.paths if p != "c1/zz-late.png"] == want.paths
    mine = got.vectors()[[got.paths.index(p) for p in want.paths]]
    np.testing.assert_array_equal(mine, want.vectors())
    np.testing.assert_array_equal(got.vectors()[got.paths.index("c1/zz-late.png")], want.vectors()[-1])
    # One warning per crash of the fast loader: one or two, as the crashes fall in one window or two.
    assert progress.warnings and all("a decoding process died" in w for w in progress.warnings)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crash_in_the_middle_of_a_batch_costs_that_file_only(tmp_path: Path, workers: int) -> None:
    """The crashing file is the second of its batch and of its isolation range, not the first."""
    clean = _folder(tmp_path / "clean", n=10)  # c0: 00 02 04 06 08, c1: 01 03 05 07 09
    _pixels(clean, tmp_path / "oracle", workers=0)
    hostile = tmp_path / "hostile"
    shutil.copytree(clean, hostile)
    shutil.copy(clean / "c0" / "00.png", hostile / "c0" / "boom-mid.png")  # scan position 5 of 11
    report = _pixels(hostile, tmp_path / "idx", _Warnings(), _Hostile(), workers=workers, batch_size=4)
    got, want = open_index(tmp_path / "idx"), open_index(tmp_path / "oracle")
    position = [e.relpath for e in scan(hostile)[0]].index("c0/boom-mid.png")
    assert position % 4 == 1  # in the middle of batch [4, 8): c0/08.png comes before it
    assert [r["path"] for r in got.skipped()] == ["c0/boom-mid.png"] and report.indexed == 10
    # The file before it in the same batch and those after it are indexed once, as a clean run does.
    assert got.paths == want.paths
    np.testing.assert_array_equal(got.vectors(), want.vectors())


class _StopAfter(_Warnings):
    """Ctrl-C once `n` files are handled."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def advance(self, n: int) -> None:
        self.n -= n
        if self.n <= 0:
            raise KeyboardInterrupt


def test_a_resumed_run_tries_a_crashed_file_again_and_finishes(tmp_path: Path) -> None:
    images = _folder(tmp_path / "imgs")
    shutil.copy(images / "c0" / "00.png", images / "c0" / "boom-a.png")  # 13th of 25 in scan order
    shutil.copy(images / "c1" / "01.png", images / "c1" / "boom-b.png")  # 25th
    (tmp_path / "log").mkdir()
    hostile = _Hostile(log=tmp_path / "log")
    cfg = dict(workers=2, batch_size=4, shard_rows=4)
    first = _StopAfter(16)
    with pytest.raises(KeyboardInterrupt):
        _pixels(images, tmp_path / "idx", first, hostile, **cfg)
    crashes = lambda name: sum(p.name.startswith(name + ".") for p in (tmp_path / "log").iterdir())  # noqa: E731
    a_crashes = crashes("boom-a")
    assert len(first.warnings) == 1 and a_crashes >= 1
    report = _pixels(images, tmp_path / "idx", decoder=hostile, **cfg)
    # A crash is not taken as settled (the machine may have been at fault): boom-a is decoded again.
    assert crashes("boom-a") > a_crashes
    assert report.indexed == 23 and report.embedded < 23  # the rest of the first run was kept
    assert sorted(r["path"] for r in open_index(tmp_path / "idx").skipped()) == [
        "c0/boom-a.png",
        "c1/boom-b.png",
    ]


def test_processes_killed_by_the_machine_stop_the_run_and_blame_no_file(tmp_path: Path) -> None:
    images = _folder(tmp_path / "imgs", n=8)
    with pytest.raises(
        RetrieveError, match=r"SIGKILL\), which is not a decoder crash.*run the command again"
    ):
        _pixels(images, tmp_path / "idx", decoder=_OOMKilled(), workers=1, batch_size=4)
    report = _pixels(images, tmp_path / "idx", workers=1, batch_size=4)  # the default decoder
    assert report.indexed == 8 and report.skipped == 0


def test_a_loader_process_lost_to_no_file_costs_no_file(tmp_path: Path) -> None:
    images = _folder(tmp_path / "imgs")
    _pixels(images, tmp_path / "oracle", workers=0)
    killed_once = _Hostile(marker=tmp_path / "killed-once")
    report = _pixels(images, tmp_path / "idx", decoder=killed_once, workers=2, batch_size=4)
    assert (tmp_path / "killed-once").exists()  # a loader process really died
    assert report.skipped == 0 and report.indexed == 23
    np.testing.assert_array_equal(
        open_index(tmp_path / "idx").vectors(), open_index(tmp_path / "oracle").vectors()
    )


def test_the_cli_reports_a_decoder_crash_as_a_warning_and_a_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _folder(tmp_path / "imgs", n=30)
    shutil.copy(images / "c0" / "00.png", images / "c0" / "boom.png")  # 16th: after batches were sent
    # The CLI has no decoder option: the job it runs is handed the hostile decoder.
    monkeypatch.setattr(
        pipelines.index_folder, "build_index", functools.partial(build_index, decoder=_Hostile())
    )
    pymp = lambda: set(Path(tempfile.gettempdir()).glob("pymp-*"))  # noqa: E731
    before = pymp()
    r = CliRunner().invoke(
        app,
        [
            "index",
            str(images),
            "-b",
            "pixels",
            "-i",
            str(tmp_path / "idx"),
            "--workers",
            "1",
            "--batch-size",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    # The dead process's fd-passing folder was this process's own, not one left behind in /tmp.
    assert pymp() - before <= {Path(multiprocessing.util.get_temp_dir())}
    out = " ".join(r.output.split())
    assert "a decoding process died" in out and "Traceback" not in out
    assert "crashed the image decoder" in out and len(open_index(tmp_path / "idx")) == 30


def test_training_data_decoded_in_processes_skips_a_crashing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retrieval.training.data as train_mod
    from retrieval.preprocess import Preprocess

    images = _folder(tmp_path / "imgs", n=12)
    shutil.copy(images / "c0" / "00.png", images / "c0" / "boom.png")
    paths = sorted(images.rglob("*.png"))
    transform = Transform(Preprocess(size=16, resize=16))
    want, _, _ = train_mod.decode_to_memory(paths, transform, 1)  # threads, in this process: no crash
    monkeypatch.setattr(train_mod, "PROCESS_DECODE_MIN", 1)
    got, ok, problems = train_mod.decode_to_memory(paths, transform, 2, decoder=_Hostile())
    boom = paths.index(images / "c0" / "boom.png")
    assert [i for i, _ in problems] == [boom] and "crashed the image decoder" in problems[0][1]
    assert ok.tolist() == [i != boom for i in range(len(paths))]
    keep = torch.from_numpy(ok)
    assert torch.equal(got[keep], want[keep])


def test_a_file_that_hangs_the_decoder_is_skipped_after_a_deadline(tmp_path: Path) -> None:
    images = _folder(tmp_path / "imgs", n=10)
    shutil.copy(images / "c0" / "00.png", images / "c0" / "hang.png")
    assert QUICK.stall_per_file_s * 4 < QUICK.stall_min_s  # x batch 4: under the minimum
    progress = _Warnings()
    report = _pixels(images, tmp_path / "idx", progress, _Hostile(), QUICK, workers=1, batch_size=4)
    assert report.indexed == 10 and "stalled (no batch in 2 s)" in progress.warnings[0]
    [row] = open_index(tmp_path / "idx").skipped()
    assert row["path"] == "c0/hang.png" and row["reason"] == "hung the image decoder (no result in 1 s)"

    # A process that stalls once (a lock inherited at fork, say) costs a retry, not the file.
    again = _folder(tmp_path / "again", n=10)
    shutil.copy(again / "c0" / "00.png", again / "c0" / "boom.png")  # sends the window to isolation
    shutil.copy(again / "c0" / "00.png", again / "c0" / "hangonce.png")
    report = _pixels(again, tmp_path / "idx2", decoder=_Hostile(), policy=QUICK, workers=1, batch_size=4)
    assert (again / "c0" / "hangonce.hung").exists()  # it did hang once
    assert report.indexed == 11 and [r["path"] for r in open_index(tmp_path / "idx2").skipped()] == [
        "c0/boom.png"
    ]


def test_a_decoder_crashing_file_after_file_stops_the_run_and_kills_blame_per_file(tmp_path: Path) -> None:
    images = _folder(tmp_path / "imgs", n=1)
    for i in range(12):
        shutil.copy(images / "c0" / "00.png", images / "c0" / f"boom{i:02d}.png")
    eight = IsolationPolicy(max_crashes_in_a_row=8)
    # Windows of batch x (prefetch x workers + 1) = 5 files: the streak must carry across them.
    with pytest.raises(RetrieveError, match=r"crashed on 8 files in a row.*look broken"):
        _pixels(images, tmp_path / "idx", decoder=_Hostile(), policy=eight, workers=1, batch_size=1)
    assert not (tmp_path / "idx" / "manifest.json").exists()

    # Files each killed once (not crashes) are retries, not one file killed twice: the loader
    # meets 02 first, then isolation meets 04 and 01 in one range (scan order 00 02 04 01 03 05).
    other = _folder(tmp_path / "other", n=6)
    killed_once_each = _KilledOnceEach(tmp_path, frozenset({"02.png", "04.png", "01.png"}))
    report = _pixels(
        other, tmp_path / "idx2", decoder=killed_once_each, policy=eight, workers=1, batch_size=4
    )
    assert report.indexed == 6 and report.skipped == 0 and len(list(tmp_path.glob("killed-*"))) == 3


def test_a_bug_while_decoding_in_isolation_is_one_clear_error(tmp_path: Path) -> None:
    images = _folder(tmp_path / "imgs", n=6)
    shutil.copy(images / "c0" / "00.png", images / "c0" / "boom.png")
    shutil.copy(images / "c0" / "00.png", images / "c0" / "oops.png")  # in boom's window
    with pytest.raises(RetrieveError, match=r"oops.png failed: KeyError"):
        _pixels(images, tmp_path / "idx", decoder=_Hostile(), workers=1, batch_size=8)


def test_viz_over_a_folder_skips_a_file_that_crashes_the_decoder(tmp_path: Path) -> None:
    from retrieval.visualise import SaliencyConfig, load_model, saliency_folder, top_patches

    images = _folder(tmp_path / "imgs", n=12)
    shutil.copy(images / "c0" / "00.png", images / "c0" / "boom.png")
    vm = load_model("lenet", "none")
    config = SaliencyConfig(method="vanilla", batch_size=4)
    run = saliency_folder(vm, images, tmp_path / "sal", config, decoder=_Hostile())
    assert run.images == 12 and [rel for rel, _ in run.skipped] == ["c0/boom.png"]
    assert "crashed the image decoder" in run.skipped[0][1]
    assert len(list((tmp_path / "sal").rglob("*.png"))) == 12
    patches = top_patches(vm, images, "conv1", channel=0, n=3, batch_size=4, device="cpu", decoder=_Hostile())
    assert patches.images == 12 and [rel for rel, _ in patches.skipped] == ["c0/boom.png"]
