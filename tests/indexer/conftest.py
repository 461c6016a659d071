"""Fixtures for indexer tests: a second tiny checkpoint (another model id) and image folders."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """A beit3-tiny checkpoint with other weights than ``tiny_checkpoint``."""
    from beit3 import create_model, save_checkpoint

    torch.manual_seed(99)
    path = tmp_path_factory.mktemp("ckpt-other") / "tiny-other"
    save_checkpoint(create_model("beit3-tiny"), path, preset="beit3-tiny", tokenizer=tokenizer)
    return path


@pytest.fixture
def shapes_dir(tmp_path):
    """32 distinct PNGs (8 colours x 4 shapes)."""
    from tests.indexer.helpers import shapes

    folder = tmp_path / "shapes"
    shapes(folder)
    return folder
