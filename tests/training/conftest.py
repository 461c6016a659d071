"""Fixtures for training tests: the coloured-shapes pairs as manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data import write_shapes
from tests.training.helpers import write_manifest


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
