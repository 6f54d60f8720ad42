"""What a new user meets first (issue #21): which index answers, help pages, output hygiene."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrieval.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: object, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("newcomer")
    out = {}
    for name, backbone in (("px", "pixels"), ("rnd", "lenet")):
        out[name] = tmp / f"idx-{name}"
        r = invoke("index", samples, "--index", out[name], "--backbone", backbone, "--workers", "0")
        assert r.exit_code == 0, r.output
    return out


def _said(r) -> str:
    return " ".join(r.stderr.split())


def test_every_index_reading_command_names_its_index_and_warns_on_random_weights(
    two: dict[str, Path], samples: Path, tmp_path: Path
) -> None:
    q = samples / "test" / "star" / "0001.png"
    r = invoke("query", q, "-i", two["rnd"], "-k", "2")
    assert r.exit_code == 0, r.output
    said = _said(r)
    assert f"index: {two['rnd']} (lenet, random weights, l2)" in said
    assert "warning:" in said and "random weights (--weights none)" in said
    r = invoke("query", q, "-i", two["px"], "-k", "2")
    said = _said(r)
    assert f"index: {two['px']} (pixels, l2)" in said and "warning" not in said
    # The same line from every command that reads indexes, once per index.
    for args in (
        ["eval", two["px"], two["rnd"]],
        ["neighbours", two["px"], two["rnd"], "-o", tmp_path / "n.html"],
        ["map", two["rnd"], "--method", "pca", "-o", tmp_path / "m.html"],
    ):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        said = _said(r)
        for idx in args[1:]:
            if isinstance(idx, Path) and idx.name.startswith("idx-"):
                assert said.count(f"index: {idx} (") == 1, (args, said)
        assert ("random weights (--weights none)" in said) == (two["rnd"] in args)


def test_query_json_says_what_paths_are_relative_to(two: dict[str, Path], samples: Path) -> None:
    r = invoke("query", samples / "test" / "star" / "0001.png", "-i", two["rnd"], "-k", "3", "--json")
    payload = json.loads(r.stdout)
    assert payload["backbone"] == "lenet" and payload["weights"]["kind"] == "none"
    root = Path(payload["root"])
    assert root.is_absolute()
    for hit in payload["results"][0]["neighbours"]:
        assert (root / hit["path"]).is_file()


def test_an_index_given_where_an_image_goes_is_named(two: dict[str, Path], samples: Path) -> None:
    # `retrieve query IMG idx-px` used to read idx-px as a second query and answer from another index.
    r = invoke("query", samples / "test" / "star" / "0001.png", two["px"], "-i", two["rnd"])
    assert r.exit_code != 0
    said = _said(r)
    assert "is an index, not an image" in said and f"--index {two['px']}" in said
    assert not r.stdout and "Traceback" not in r.output


def test_a_cached_map_does_not_announce_or_time_the_work_it_skips(
    two: dict[str, Path], tmp_path: Path
) -> None:
    args = ["map", two["px"], "--method", "pca", "-o", tmp_path / "m.html"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "PCA of 72 of 72 vectors" in _said(first)
    again = invoke(*args)
    said = _said(again)
    assert again.exit_code == 0 and "vectors (" not in said and "projection 0.0s (cached)" in said


def test_the_demo_suggests_a_longer_run_than_it_made(tmp_path: Path) -> None:
    from pipelines.demo import DemoReport

    idx = {"pixels": tmp_path / "px", "lenet": tmp_path / "ln"}
    for epochs in (30, 5):
        text = DemoReport(
            out=tmp_path,
            images=tmp_path / "images",
            checkpoint=tmp_path / "best.pt",
            indexes=idx,
            test_indexes=idx,
            results=[],
            caption="",
            sheet=tmp_path / "s.html",
            sheet_png=tmp_path / "s.png",
            map=None,
            epochs=epochs,
        ).summary()
        assert f"--epochs {2 * epochs}" in text and f"--epochs {epochs} " not in text


def _commands() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    out = []
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        out += [[name, sub] for sub in subs] if subs else [[name]]
    return out


@pytest.mark.parametrize("words", _commands(), ids=" ".join)
def test_every_help_page_teaches_in_one_style(words: list[str]) -> None:
    width = 100
    r = runner.invoke(app, [*words, "--help"], env={"COLUMNS": str(width)})
    assert r.exit_code == 0, r.output
    page = r.stdout
    # Examples that run the command itself.
    assert "Examples:" in page and f"retrieve {' '.join(words)} " in page
    # No type noise, one style of default, no long options of one letter.
    for noise in ("<bool>", "<list[", "<int>", "<str>", "<path>", "Default:", "(default"):
        assert noise not in page, noise
    assert not [w for w in page.split() if len(w) == 3 and w.startswith("--") and w[2].isalpha()]
    # Prose is filled to the width, not broken where the source's lines ended: a line that a
    # paragraph continues after is too full to take the next line's first word.
    prose = page.split("╭")[0].splitlines()
    for line, nxt in itertools.pairwise(prose):
        line, nxt = line.rstrip(), nxt.strip()
        if line.strip() and nxt and not line.startswith("   ") and not nxt.startswith("retrieve "):
            assert len(line) + 1 + len(nxt.split()[0]) > width - 2, (line, nxt)


def test_info_says_each_thing_once(two: dict[str, Path]) -> None:
    r = invoke("info", two["px"], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in r.stdout.splitlines()
        if line.count("│") >= 3
    }
    assert rows["backbone"] == "pixels  3072-d"  # no "layer -" for a space without a network
    assert "pixels: pixels" not in r.stdout and rows["weights"] == "none: raw pixels, no network"
    r = invoke("info", two["rnd"], env={"COLUMNS": "120"})
    assert "layer " in r.stdout and "none: random-init" in r.stdout


def test_the_table_measures_wide_characters_in_terminal_cells() -> None:
    # Widths were counted in characters: a CJK space name is two cells each and pushed past 80.
    import io

    from rich.cells import cell_len
    from rich.console import Console

    from retrieval.cli._table import print_metrics
    from retrieval.evaluate import best_per_metric
    from retrieval.evaluate.spaces import SpaceResult

    names = ["P@10", "MAP@R", "R-precision", "recall@10", "mAP", "P@1", "P@5", "kNN@5", "kNN@10"]
    results = [
        SpaceResult(
            name, "leave-one-out", 10, 10, 10, {n: 0.1 * i for i, n in enumerate(names)}, extra={"dim": 4}
        )
        for name in ("像素空间的基线索引", "pixels")
    ]
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    print_metrics(console, results, "caption", best_per_metric(results), lambda s: s)
    lines = out.getvalue().splitlines()
    assert max(cell_len(line) for line in lines) <= 80, "\n".join(lines)
    assert "…" not in out.getvalue()


def test_natural_order_is_total() -> None:
    from retrieval.text import natural_sorted

    # "a1" and "A01" are equal under the natural key: their order must not depend on the input's.
    assert natural_sorted(["A01", "a1", "b"]) == natural_sorted(["a1", "A01", "b"]) == ["A01", "a1", "b"]


@pytest.mark.parametrize(
    ("args", "now"),
    [
        (["eval", "x", "--k", "1"], "-k or --cutoffs"),
        (["neighbours", "x", "--n", "2"], "-n or --num-queries"),
        (["query", "x", "--k", "3"], "-k or --top-k"),
    ],
)
def test_the_old_long_k_and_n_name_their_new_spelling(args: list[str], now: str) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and f"{args[2]} was renamed: use {now}." in r.output
    assert "Traceback" not in r.output


def test_an_unknown_option_is_still_click_s_error() -> None:
    r = CliRunner().invoke(app, ["query", "x", "--zz", "3"])
    assert r.exit_code == 2 and "No such option: --zz" in r.output


def test_weights_have_one_wording() -> None:
    # The map title, the sheet and the CLI each had their own words ("ImageNet weights", "ImageNet",
    # "IMAGENET1K_V2"); one method now says it for all three.
    from retrieval.store.manifest import WeightsRecord

    def w(kind: str, id_: str) -> WeightsRecord:
        return WeightsRecord(kind, id_, "")

    assert [w(k, i).words() for k, i in [("pixels", ""), ("none", "random-init(seed=0)")]] == [
        "raw pixels",
        "random weights",
    ]
    assert w("imagenet", "IMAGENET1K_V2").words() == "ImageNet"
    assert w("imagenet", "IMAGENET1K_V2").words(full=True) == "ImageNet (IMAGENET1K_V2)"
    assert w("checkpoint", "runs/r8/best.pt").words() == "best.pt"
    assert w("checkpoint", "runs/r8/best.pt").words(full=True) == "runs/r8/best.pt"
