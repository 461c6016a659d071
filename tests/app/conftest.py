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
