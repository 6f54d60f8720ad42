"""The CLI through typer's CliRunner and as a real subprocess; errors are one line, never a traceback."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrieval.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lenet_index(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    # Module-scoped: the autouse state fixture is per-test, so tests pass --index explicitly.
    index = tmp_path_factory.mktemp("cli") / "idx"
    r = invoke("index", samples, "--index", index, "--backbone", "lenet", "--workers", "0")
    assert r.exit_code == 0, r.output
    return index


def test_index_prints_summary_and_query_finds_itself(lenet_index: Path, samples: Path) -> None:
    query = samples / "test" / "star" / "0001.png"
    r = invoke("query", query, "--index", lenet_index, "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    hits = payload["results"][0]["neighbours"]
    assert len(hits) == 3 and hits[0]["path"] == "test/star/0001.png" and hits[0]["distance"] < 1e-3
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(a["distance"] <= b["distance"] for a, b in itertools.pairwise(hits))


def test_query_by_id_excludes_itself_and_table_output(lenet_index: Path) -> None:
    r = invoke("query", "--id", "train/circle/0002.png", "--index", lenet_index, "-k", "4", "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["results"][0]["neighbours"]
    assert len(hits) == 4 and "train/circle/0002.png" not in [h["path"] for h in hits]
    r = invoke("query", "--id", "train/circle/0002.png", "--index", lenet_index, "-k", "2")
    assert r.exit_code == 0 and "rank" in r.stdout and "distance" in r.stdout


def test_one_bad_query_does_not_cost_the_others(lenet_index: Path, samples: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    good = samples / "test" / "star" / "0001.png"
    args = ["query", good, tmp_path / "notes.png", "--id", "nope.png", "--id", "train/circle/0002.png"]
    r = invoke(*args, "--index", lenet_index, "-k", "2", "--json")
    assert r.exit_code == 1, r.output  # answered, but not all of it
    payload = json.loads(r.stdout)
    # The answers are what each query gives on its own.
    alone = json.loads(invoke("query", good, "--index", lenet_index, "-k", "2", "--json").stdout)
    by_id = json.loads(
        invoke("query", "--id", "train/circle/0002.png", "--index", lenet_index, "-k", "2", "--json").stdout
    )
    assert payload["results"] == alone["results"] + by_id["results"]
    assert [e["query"] for e in payload["errors"]] == [str(tmp_path / "notes.png"), "nope.png"]
    stderr = " ".join(r.stderr.split())
    assert "notes.png" in stderr and "'nope.png' is not in the index" in stderr and "Traceback" not in stderr
    r = invoke(*args, "--index", lenet_index, "-k", "2")  # tables for the two answered
    assert r.exit_code == 1 and r.stdout.count("rank") == 2
    r = invoke("query", tmp_path / "notes.png", "--id", "nope.png", "--index", lenet_index)
    assert r.exit_code == 2 and not r.stdout and "notes.png" in r.stderr
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    r = invoke(
        "query",
        tmp_path / "notes.png",
        "--id",
        "²",
        "--id",
        tmp_path / "loop",
        "--index",
        lenet_index,
        "--json",
    )
    assert r.exit_code == 2 and "Traceback" not in r.output  # nothing answered, and still JSON
    assert json.loads(r.stdout)["results"] == [] and len(json.loads(r.stdout)["errors"]) == 3


def test_last_index_is_remembered(samples: Path, tmp_path: Path) -> None:
    r = invoke("index", samples, "--index", tmp_path / "px", "--backbone", "pixels", "--workers", "0")
    assert r.exit_code == 0, r.output
    r = invoke("query", "--id", "0", "-k", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["index"] == str((tmp_path / "px").absolute())
    r = invoke("info")
    assert r.exit_code == 0 and "pixels" in r.stdout and "72 indexed" in r.stdout


def test_info_and_backbones(lenet_index: Path) -> None:
    r = invoke("info", lenet_index, "--json")
    manifest = json.loads(r.stdout)
    assert manifest["backbone"] == "lenet" and manifest["dim"] == 84 and manifest["counts"]["indexed"] == 72
    assert len(manifest["weights"]["sha256"]) == 64 and manifest["preprocess"]["size"] == 32
    r = invoke("backbones", "--json")
    names = {b["name"]: b for b in json.loads(r.stdout)}
    assert names["vgg16"]["layer"] == "classifier.4" and names["resnet50"]["dim"] == 2048
    assert (
        names["airnet_small"]["train_recipe"]["schedule"] == "onecycle"
        and names["lenet"]["train_recipe"] == {}
    )
    assert manifest["tta"] is False  # the default: one view per image


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["query", "x.jpg"], "No index given and none built yet"),
        (["index", "/definitely/not/here"], "is not a folder"),
        (["index", ".", "--backbone", "resnet9"], "Unknown backbone 'resnet9'. Known backbones:"),
        (["index", ".", "--weights", "missing.pt"], "neither 'imagenet', 'none' nor an existing checkpoint"),
        (["info", "/nonexistent-index"], "No index at"),
    ],
)
def test_errors_are_one_clear_line(args: list[str], message: str) -> None:
    r = invoke(*args)
    assert r.exit_code == 2
    assert message in r.output.replace("\n", " ") or message in r.stderr.replace("\n", " ")
    assert "Traceback" not in r.output


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, samples: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    r = invoke("index", samples, "--weights", tmp_path / "bad.pt", "--index", tmp_path / "i")
    assert r.exit_code == 2 and "not a readable checkpoint" in r.output and "Traceback" not in r.output


def test_real_subprocess(tmp_path: Path, samples: Path) -> None:
    env = {**os.environ, "RETRIEVE_STATE_DIR": str(tmp_path / "state")}
    exe = Path(sys.executable).with_name("retrieve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "retrieval"]
    out = subprocess.run(
        [*cmd, "index", str(samples / "test"), "--backbone", "pixels", "--index", str(tmp_path / "i")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "indexed 24 images" in out.stderr and "img/s" in out.stderr
    q = subprocess.run(
        [*cmd, "query", str(samples / "test" / "ring" / "0000.png"), "-k", "1", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["results"][0]["neighbours"][0]["path"] == "ring/0000.png"
    bad = subprocess.run(
        [*cmd, "query", "--id", "nope.png"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "not in the index" in bad.stderr and "Traceback" not in bad.stderr
