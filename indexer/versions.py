"""Model versions of the tables of a database: list, activate, remove (see indexer.manifest).

``beit3 index ... --model NEW`` builds a version beside the active one (indexer.build); these
functions are the rest of the life cycle. Activation is one atomic manifest write: a Searcher
running beside it answers each query from one version, the old one before, the new one after.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beit3.errors import InputDataError
from indexer.manifest import DbManifest, Version, manifest_lock, write_lock
from indexer.stores import drop_store, open_store

__all__ = ["VersionInfo", "activate_version", "list_versions", "remove_version", "version_paths"]


@dataclass(frozen=True)
class VersionInfo:
    """One version as listed: ``items`` is the row count at its last finished commit (None while
    its first build runs); ``metrics`` the checkpoint's ``metrics.json`` when it has one."""

    id: str
    table: str
    model_id: str
    checkpoint: Path
    encoder: str
    items: int | None
    created: str
    committed: str | None
    active: bool
    metrics: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "checkpoint": str(self.checkpoint)}


def _manifest(db: str | Path) -> DbManifest:
    manifest = DbManifest.read(db)
    if manifest is None:
        raise InputDataError(f"{db} is not a beit3 index (no beit3_index.json)")
    return manifest


def list_versions(db: str | Path) -> list[VersionInfo]:
    """Every version of every table, tables by name, versions oldest first."""
    manifest = _manifest(db)
    out = []
    for table in sorted(manifest.tables):
        active = manifest.tables[table].get("active")
        for version in manifest.table_versions(table):
            checkpoint = manifest.checkpoint_path(db, version)
            out.append(
                VersionInfo(
                    id=version.id,
                    table=table,
                    model_id=version.model_id,
                    checkpoint=checkpoint,
                    encoder=version.encoder,
                    items=version.count,
                    created=version.created,
                    committed=version.committed,
                    active=version.id == active,
                    metrics=_metrics(checkpoint),
                )
            )
    return out


def _metrics(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def activate_version(db: str | Path, version_id: str) -> VersionInfo:
    """Make ``version_id`` the version its table's searches use (atomic).

    Raises:
        InputDataError: no such version, or its build has not finished (no commit yet).
    """
    with manifest_lock(db):
        manifest = _manifest(db)
        version = manifest.version(version_id)
        if not version.ready:
            raise InputDataError(
                f"version {version_id} of table {version.table!r} has not finished building; "
                "run its beit3 index again (it resumes), then activate it"
            )
        manifest.tables[version.table]["active"] = version_id
        manifest.write(db)
    return next(v for v in list_versions(db) if v.id == version_id)


def remove_version(db: str | Path, version_id: str) -> None:
    """Delete a version that is not active, with its vectors.

    Raises:
        InputDataError: no such version, it is active, or an indexing run is writing ``db``.
    """
    with write_lock(db, f"beit3 versions remove {version_id}"):
        with manifest_lock(db):
            manifest = _manifest(db)
            version = manifest.version(version_id)
            if manifest.tables[version.table].get("active") == version_id:
                raise InputDataError(
                    f"version {version_id} is the active version of table {version.table!r}; "
                    "activate another one first (beit3 versions activate ID)"
                )
            del manifest.versions[version_id]
            manifest.write(db)
        drop_store(Path(db), version.store, manifest.tables[version.table]["backend"])
        # a checkpoint kept inside the database (beit3 improve copies its models there) goes
        # with its last version
        checkpoint = manifest.checkpoint_path(db, version).resolve()
        inside = Path(db).resolve() in checkpoint.parents
        used = any(
            manifest.checkpoint_path(db, other).resolve() == checkpoint
            for other in map(manifest.version, manifest.versions)
        )
        if inside and not used:
            shutil.rmtree(checkpoint, ignore_errors=True)


def version_paths(db: str | Path, version_id: str) -> list[str]:
    """Every item reference of a version: file paths (image tables) or ``file:line``
    references (text tables), sorted."""
    manifest = _manifest(db)
    version: Version = manifest.version(version_id)
    entry = manifest.tables[version.table]
    store = open_store(
        Path(db),
        version.store,
        entry["backend"],
        dim=version.dim,
        index_type=entry.get("index_type"),
    )
    store.pin(version.snapshot)
    meta = store.read_meta()
    return sorted(p for paths in meta.column("paths").to_pylist() for p in paths or ())
