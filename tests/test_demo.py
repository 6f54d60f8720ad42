"""`retrieve demo` end to end with a tiny training run: the trained space must beat pixels on held-out images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.demo import DemoConfig, run_demo
from retrieval.cli import app

# Small enough for the suite (about half a minute on 2 cores), large enough that features beat pixels.
TINY = {"per_class": 500, "test_per_class": 12, "arch": "lenet", "epochs": 20}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "retrieve-demo"
    runner = CliRunner()
    # The ImageNet space has its own, smaller test below: at 224 px it would double this one's time.
    args = ["demo", str(out), "--device", "cpu", "--no-imagenet", "--per-class", str(TINY["per_class"])]
    args += [
        "--epochs",
        str(TINY["epochs"]),
        "--arch",
        TINY["arch"],
        "--test-per-class",
        str(TINY["test_per_class"]),
    ]
    res = runner.invoke(app, args, env={"RETRIEVE_STATE_DIR": str(out.parent / "state")})
    assert res.exit_code == 0, res.output
    return out, res.stdout


def test_demo_writes_everything_and_says_where(demo: tuple[Path, str]) -> None:
    out, stdout = demo
    for name in ("neighbours.html", "neighbours.png", "model/lenet/best.pt"):
        assert (out / name).is_file(), name
    assert (out / "images" / "train").is_dir() and (out / "images" / "test").is_dir()
    assert "pixels" in stdout and "MAP@R" in stdout
    assert "next:" in stdout and f"retrieve query {out}" in stdout
    html = (out / "neighbours.html").read_text()
    assert html.count('class="query"') == 8 * 2  # 8 queries (one per class) x 2 spaces


def test_trained_space_beats_pixels_on_held_out_images(demo: tuple[Path, str]) -> None:
    """The oracle is the pixel space on the same held-out queries, computed by `retrieve eval`."""
    out, _ = demo
    idx = out / "indexes"
    trained = next(p for p in idx.iterdir() if p.name.endswith("-trained"))
    res = CliRunner().invoke(
        app, ["eval", str(idx / "pixels"), str(trained), "--queries", str(out / "images" / "test"), "--json"]
    )
    assert res.exit_code == 0, res.output
    rows = {r["space"]: r["metrics"] for r in json.loads(res.stdout)["spaces"]}
    pixels, net = rows["pixels"]["P@5"], rows[trained.name]["P@5"]
    # 8 balanced classes: chance is 0.125. Pixels sit near it; the trained net must be clearly above.
    assert net >= pixels + 0.15, (pixels, net)
    assert net >= 1.5 * pixels, (pixels, net)


def test_rerun_in_a_subprocess_reuses_every_step(demo: tuple[Path, str]) -> None:
    out, _ = demo
    checkpoint = out / "model" / "lenet" / "best.pt"
    before = checkpoint.stat().st_mtime_ns
    args = [sys.executable, "-m", "retrieval", "demo", str(out), "--device", "cpu", "--no-imagenet"]
    for key in ("per_class", "test_per_class", "arch", "epochs"):
        args += [f"--{key.replace('_', '-')}", str(TINY[key])]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=_env(out))
    assert res.returncode == 0, res.stderr
    assert "reused: images, model, indexes" in res.stdout
    assert checkpoint.stat().st_mtime_ns == before
    # The library call with the same settings agrees.
    report = run_demo(DemoConfig(out=out, device="cpu", pretrained=None, **TINY))
    assert set(report.reused) >= {"images", "model", "indexes"}


def test_the_demo_shows_frozen_imagenet_features_beside_pixels(tmp_path: Path) -> None:
    """The third space: EfficientNet-Lite0's installed ImageNet weights, never trained on shapes."""
    out = tmp_path / "demo"
    report = run_demo(DemoConfig(out=out, device="cpu", per_class=40, test_per_class=5, epochs=1, map=False))
    by_name = {r.name: r.metrics for r in report.results}
    assert list(by_name) == ["pixels", "efficientnet_lite0-imagenet", "lenet-trained"]
    # The oracle: pixel space on the same 40 held-out queries (8 classes: chance is 0.125).
    assert by_name["efficientnet_lite0-imagenet"]["P@5"] >= 1.5 * by_name["pixels"]["P@5"], by_name
    assert "efficientnet_lite0 with ImageNet weights, frozen" in report.caption
    assert (out / "neighbours.html").read_text().count('class="query"') == 8 * 3
    summary = report.summary()
    assert str(report.indexes["efficientnet_lite0-imagenet"]) in summary
    assert f"--index {report.indexes['lenet-trained']}" in summary  # the query hint: the trained space


def _env(out: Path) -> dict[str, str]:
    import os

    return {**os.environ, "RETRIEVE_STATE_DIR": str(out.parent / "state")}
