"""A small real index for the app tests: shapes images and their captions, tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data import write_shapes


@pytest.fixture(scope="session")
def app_db(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """An index with an ``images`` table (32 PNGs) and a ``texts`` table (their 32 captions),
    built by the real indexer with the tiny checkpoint."""
    from indexer import index_images, index_texts

    root = tmp_path_factory.mktemp("app_index")
    pairs = write_shapes(root / "images")
    captions = root / "captions.txt"
    captions.write_text("".join(f"{text}\n" for _, text in pairs))
    db = root / "db"
    index_images([root / "images"], db, model=tiny_checkpoint)
    index_texts(captions, db, model=tiny_checkpoint)
    return db


@pytest.fixture(scope="session")
def app_searcher(app_db: Path):
    """The same index opened directly, to compute what the page should show."""
    from indexer import Searcher

    return Searcher(app_db)


MATCHER_BIAS = -5.0  # calibration bias of the matcher fixture: every match is about 0.7%


@pytest.fixture(scope="session")
def matcher_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A randomly initialised beit3-tiny with a matcher (architecture retrieval-itm), calibrated
    so that no pair is likely to match: its raw logits are near 0, so every probability is about
    sigmoid(-5) = 0.7%, far below any cutoff a test sets (and equal to the page's to the digit)."""
    import torch

    from beit3 import create_model, save_checkpoint

    torch.manual_seed(4321)
    model = create_model("beit3-tiny", "retrieval-itm", vocab_size=tokenizer.vocab_size)
    model.calibrate_(1.0, MATCHER_BIAS)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-itm"
    save_checkpoint(model, path, preset="beit3-tiny", tokenizer=tokenizer)
    return path


@pytest.fixture(scope="session")
def matcher_db(tmp_path_factory: pytest.TempPathFactory, matcher_checkpoint: Path) -> Path:
    """The app index (32 shapes images and their captions) built with the matcher checkpoint."""
    from indexer import index_images, index_texts

    root = tmp_path_factory.mktemp("matcher_index")
    pairs = write_shapes(root / "images")
    captions = root / "captions.txt"
    captions.write_text("".join(f"{text}\n" for _, text in pairs))
    db = root / "db"
    index_images([root / "images"], db, model=matcher_checkpoint)
    index_texts(captions, db, model=matcher_checkpoint)
    return db


@pytest.fixture(scope="session")
def matcher_searcher(matcher_db: Path):
    from indexer import Searcher

    return Searcher(matcher_db)
