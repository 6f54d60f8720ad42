"""The code base stays `ruff check` and `ruff format --check` clean, and every module has a docstring."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(args: list[str]) -> None:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is in the test extras: pip install -e '.[test]'"
    out = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_module_starts_with_a_docstring() -> None:
    missing = []
    for folder in ("retrieval", "pipelines", "bench", "data"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if (path.name != "__init__.py" or tree.body) and ast.get_docstring(tree) is None:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules without a docstring: {missing}"
