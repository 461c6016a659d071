"""The embedded default: the bundled emoji images and names, indexed with the bundled model.

``beit3 demo`` (and ``make demo``) calls :func:`build_demo_index`, then serves the app on it. The
index lives in a cache folder named after the model id, and indexing is incremental, so a second
run only checks file sizes and times.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from beit3 import load_checkpoint
from beit3.errors import InputDataError
from indexer import IndexReport, index_images, index_texts
from indexer.build import ProgressFn
from indexer.embed import resolve_device

__all__ = ["DEMO_CAPTIONS", "DEMO_MODEL", "build_demo_index", "default_demo_db"]

_DEMO = Path(__file__).resolve().parents[1] / "demo"
DEMO_CAPTIONS = _DEMO / "data" / "emoji" / "captions.jsonl"
DEMO_MODEL = _DEMO / "model"


def _check_bundle() -> str:
    for path, what in ((DEMO_CAPTIONS, "demo data"), (DEMO_MODEL / "config.json", "demo model")):
        if not path.is_file():
            raise InputDataError(
                f"{path}: the bundled {what} is missing; run from a clone of the repository "
                "(pip install -e .), or rebuild it with make demo-data / make demo-model"
            )
    import json

    return json.loads((DEMO_MODEL / "config.json").read_text())["model_id"]


def default_demo_db() -> Path:
    """``$XDG_CACHE_HOME/beit3-search/demo-<model id>`` (``~/.cache`` by default)."""
    model_id = _check_bundle()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "beit3-search" / ("demo-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_id))


def build_demo_index(
    db: str | Path | None = None,
    *,
    captions: str | Path | None = None,
    model: str | Path | None = None,
    device: str = "auto",
    num_workers: int = 2,
    progress: ProgressFn | None = None,
) -> tuple[Path, IndexReport, IndexReport]:
    """Index the emoji images (labelled with their names) and the names as a text table.

    Args:
        db: the database directory; default :func:`default_demo_db`.
        captions: a captions file in the bundled format (default: the whole bundled set; tests
            pass a slice).
        model: the checkpoint directory that embeds both tables (default: the bundled model).
        device, num_workers, progress: as for :func:`indexer.index_images`.

    Returns:
        (db, images report, texts report).
    """
    _check_bundle()
    db = Path(db) if db is not None else default_demo_db()
    captions = Path(captions) if captions is not None else DEMO_CAPTIONS
    checkpoint = load_checkpoint(  # once for both tables
        Path(model) if model is not None else DEMO_MODEL, device=resolve_device(device)
    )
    images = index_images(
        [captions],
        db,
        checkpoint,
        table="images",
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
    texts = index_texts(
        captions, db, checkpoint, column="text", table="texts", device=device, progress=progress
    )
    return db, images, texts
