"""Shared fixtures: generated sample images, an isolated state dir, and a tiny pixel/LeNet index."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from retrieval.samples import SampleConfig, make_samples


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never read or write the user's "last index" or download cache from a test.
    monkeypatch.setenv("RETRIEVE_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes x (6 train + 3 test) 48 px PNGs."""
    return make_samples(
        tmp_path_factory.mktemp("samples"), SampleConfig(per_class=6, test_per_class=3, size=48)
    )


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for modules of tiny nets, restored afterwards.

    Tiny nets run as fast on one thread, and on a shared 2-core machine two OpenMP threads that
    spin-wait for each other were measured 5-20x slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
