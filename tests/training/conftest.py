"""Fixtures for training tests: the coloured-shapes pairs as manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.data import write_shapes
from tests.training.helpers import write_manifest


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, loaded machine two
    OpenMP threads that busy-wait make small ops up to ~100x slower (measured: a tiny step
    11 ms with 1 thread, 1.7 s with 2, unless OMP_WAIT_POLICY=PASSIVE)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shapes(tmp_path: Path) -> dict[str, Path]:
    """64 pairs (32 colour x shape captions, 2 jitter variants) at 32 px: train.jsonl holds all
    64, eval.jsonl the 32 variant-0 images with their (then unique) captions."""
    pairs = write_shapes(tmp_path / "imgs", size=32, variants=2)
    return {
        "root": tmp_path,
        "train": write_manifest(tmp_path / "train.jsonl", pairs),
        "eval": write_manifest(tmp_path / "eval.jsonl", pairs[:32]),
    }
