"""The database manifest ``<db>/beit3_index.json``: which model built the index, and its tables.

It lets ``beit3 search --db DIR`` find the checkpoint without ``--model``, and makes an index
built by one model refuse queries and additions from another (the model id is name + weights hash).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from beit3.errors import IndexMismatchError, InputDataError

__all__ = ["MANIFEST_NAME", "DbManifest", "TableInfo", "check_table_name"]

MANIFEST_NAME = "beit3_index.json"
FORMAT_VERSION = 1
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class TableInfo:
    """One table of a database. ``index_type``: flat/hnsw/ivfpq (FAISS) or a LanceDB ANN index
    (None = exact search)."""

    name: str
    modality: str  # "image" | "text"
    count: int
    backend: str  # "lancedb" | "faiss"
    model_id: str
    dim: int
    index_type: str | None = None


@dataclass
class DbManifest:
    """Contents of ``beit3_index.json``."""

    model_id: str
    checkpoint: str  # relative to the database directory (or absolute)
    dim: int
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def path_of(cls, db: str | Path) -> Path:
        return Path(db) / MANIFEST_NAME

    @classmethod
    def read(cls, db: str | Path) -> DbManifest | None:
        """The manifest of ``db``, or None if the directory holds no index yet."""
        path = cls.path_of(db)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputDataError(
                f"{path}: not a valid beit3 index manifest ({exc}); "
                "delete the directory and re-index"
            ) from None
        if manifest.format_version > FORMAT_VERSION:
            raise InputDataError(
                f"{path}: format_version {manifest.format_version} is newer "
                f"than this library's {FORMAT_VERSION}; upgrade beit3-search"
            )
        return manifest

    def write(self, db: str | Path) -> None:
        """Write atomically (temporary file, then rename)."""
        path = self.path_of(db)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def checkpoint_path(self, db: str | Path) -> Path:
        """The recorded checkpoint directory (stored relative to ``db``, so that a folder holding
        both can move)."""
        path = Path(self.checkpoint)
        return path if path.is_absolute() else Path(os.path.normpath(Path(db).absolute() / path))

    def set_checkpoint(self, db: str | Path, checkpoint: str | Path) -> None:
        self.checkpoint = os.path.relpath(Path(checkpoint).absolute(), Path(db).absolute())

    def check_model(self, db: str | Path, model_id: str, *, action: str) -> None:
        """Raise IndexMismatchError unless ``model_id`` built this index."""
        if model_id != self.model_id:
            raise IndexMismatchError(
                f"index {db} was built by {self.model_id}; the {action} model is {model_id}; "
                f"re-index into a new --db, or pass --model {self.checkpoint_path(db)}"
            )

    def table_info(self, name: str, count: int) -> TableInfo:
        entry = self.tables[name]
        return TableInfo(
            name=name,
            modality=entry["modality"],
            count=count,
            backend=entry["backend"],
            model_id=self.model_id,
            dim=self.dim,
            index_type=entry.get("index_type"),
        )


def check_table_name(name: str) -> str:
    if not _TABLE_NAME.fullmatch(name):
        raise InputDataError(
            f"table name {name!r} is not allowed: use letters, digits, '_' or '-' (at most 64, "
            "starting with a letter or digit)"
        )
    return name
