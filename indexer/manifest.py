"""The database manifest ``<db>/beit3_index.json``: tables, their model versions, the active one.

A database holds tables (``images``, ``texts``...). Each table has one or more *versions*: the same
items embedded by one model (``model_id`` = name + weights hash, ``encoder`` = fp32 or int8), each
in its own store (LanceDB table or FAISS folder). One version per table is *active*: searches use
it; ``beit3 index ... --model NEW`` builds another beside it while it keeps serving, and
``beit3 versions activate ID`` switches in one atomic manifest write.

A version also records ``snapshot``: the store's version (Lance) at its last finished commit.
Readers pin to it, so they see whole runs only: rows a running (or killed) indexer wrote after that
commit stay invisible until its commit finishes.

Format 1 (one model per database, before versions) is read as one version ``v1`` per table and
written back as format 2 by the next write.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from beit3.errors import IndexMismatchError, InputDataError

__all__ = [
    "MANIFEST_NAME",
    "DbManifest",
    "TableInfo",
    "Version",
    "check_table_name",
    "manifest_lock",
    "now_utc",
    "write_lock",
]

MANIFEST_NAME = "beit3_index.json"
FORMAT_VERSION = 2
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_WRITE_LOCK = ".beit3-write.lock"
_MANIFEST_LOCK = ".beit3-manifest.lock"


@dataclass(frozen=True)
class TableInfo:
    """One table of a database, as searched now (its active version). ``index_type``:
    flat/hnsw/ivfpq (FAISS) or a LanceDB ANN index (None = exact search)."""

    name: str
    modality: str  # "image" | "text"
    count: int
    backend: str  # "lancedb" | "faiss"
    model_id: str
    dim: int
    index_type: str | None = None
    version: str = "v1"
    encoder: str = "fp32"


@dataclass
class Version:
    """One model version of a table (an entry of the manifest's ``versions``)."""

    id: str
    table: str
    store: str  # the store's name: the table's own name for its first version, else table.vN
    model_id: str
    checkpoint: str  # relative to the database directory (or absolute)
    dim: int
    checkpoint_absolute: str = ""  # the same, absolute: found when the database moved alone
    encoder: str = "fp32"
    created: str = ""
    snapshot: int | None = None  # the store version of the last finished commit
    count: int | None = None  # rows at that commit
    committed: str | None = None  # time of that commit; None: never finished

    @property
    def ready(self) -> bool:
        return self.committed is not None


@dataclass
class DbManifest:
    """Contents of ``beit3_index.json``.

    ``tables``: name -> {modality, backend, index_type, active (a version id or None)};
    ``versions``: id -> :class:`Version` fields.
    """

    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_version: int = 1
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
            if data.get("format_version", 1) == 1:
                data = _from_format_1(data)
            manifest = cls(**data)
            for entry in manifest.versions.values():
                Version(**entry)  # every field known and present
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
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

    # -- versions ----------------------------------------------------------------------------------

    def version(self, version_id: str) -> Version:
        if version_id not in self.versions:
            known = ", ".join(sorted(self.versions, key=_version_order)) or "none"
            raise InputDataError(f"no version {version_id!r} in this index; its versions: {known}")
        return Version(**self.versions[version_id])

    def put_version(self, version: Version) -> None:
        self.versions[version.id] = asdict(version)

    def active(self, table: str) -> Version | None:
        """The version of ``table`` that searches use (None: the table is still being built)."""
        entry = self.tables.get(table)
        if entry is None or entry.get("active") is None:
            return None
        return self.version(entry["active"])

    def table_versions(self, table: str) -> list[Version]:
        return [
            Version(**v)
            for vid, v in sorted(self.versions.items(), key=lambda kv: _version_order(kv[0]))
            if v["table"] == table
        ]

    def new_version(
        self,
        db: str | Path,
        table: str,
        model_id: str,
        checkpoint: str | Path,
        dim: int,
        encoder: str = "fp32",
    ) -> Version:
        """Add a (not yet committed) version of ``table``; its store is named after the table for
        the first version, ``table.vN`` after (a name no table can have)."""
        vid = f"v{self.next_version}"
        self.next_version += 1
        first = not self.table_versions(table)
        version = Version(
            id=vid,
            table=table,
            store=table if first else f"{table}.{vid}",
            model_id=model_id,
            checkpoint="",
            dim=dim,
            encoder=encoder,
            created=now_utc(),
        )
        version.checkpoint = _relative(db, checkpoint)
        version.checkpoint_absolute = str(Path(checkpoint).absolute())
        self.put_version(version)
        return version

    def searchable(self) -> dict[str, Version]:
        """table -> active version, for the tables that have one."""
        out = {}
        for name in self.tables:
            version = self.active(name)
            if version is not None:
                out[name] = version
        return out

    def default_version(self) -> Version | None:
        """The version whose model a run without ``--model`` uses: the one model of the active
        versions (None for an empty database).

        Raises:
            InputDataError: the active versions use several models.
        """
        models = {v.model_id: v for v in self.searchable().values()}
        if not models:
            building = [Version(**v) for v in self.versions.values()]
            return building[-1] if building else None
        if len(models) > 1:
            raise InputDataError(
                f"the tables of this index use {len(models)} models ({', '.join(sorted(models))}); "
                "pass --model to choose one"
            )
        return next(iter(models.values()))

    def checkpoint_path(self, db: str | Path, version: Version) -> Path:
        """The version's checkpoint directory: stored relative to ``db`` (a folder holding both
        can move) and absolute (the database alone can move); the relative one first."""
        path = Path(version.checkpoint)
        path = path if path.is_absolute() else Path(os.path.normpath(Path(db).absolute() / path))
        absolute = Path(version.checkpoint_absolute) if version.checkpoint_absolute else None
        if not path.is_dir() and absolute is not None and absolute.is_dir():
            return absolute
        return path

    def check_model(self, db: str | Path, version: Version, model_id: str, *, action: str) -> None:
        """Raise IndexMismatchError unless ``model_id`` built ``version``."""
        if model_id != version.model_id:
            raise IndexMismatchError(
                f"table {version.table!r} of index {db} is searched with {version.model_id} "
                f"(version {version.id}); the {action} model is {model_id}; pass --model "
                f"{self.checkpoint_path(db, version)}, or build a version with the new model "
                "(beit3 index ... --model NEW) and activate it (beit3 versions activate)"
            )

    def table_info(self, name: str, count: int) -> TableInfo:
        entry = self.tables[name]
        version = self.active(name)
        assert version is not None, f"table {name} has no active version"
        return TableInfo(
            name=name,
            modality=entry["modality"],
            count=count,
            backend=entry["backend"],
            model_id=version.model_id,
            dim=version.dim,
            index_type=entry.get("index_type"),
            version=version.id,
            encoder=version.encoder,
        )


def _from_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest (one model for the database) as format 2: version v1 per table."""
    tables, versions = {}, {}
    for n, (name, entry) in enumerate(sorted(data["tables"].items()), 1):
        vid = f"v{n}"
        tables[name] = {**entry, "active": vid}
        versions[vid] = asdict(
            Version(
                id=vid,
                table=name,
                store=name,
                model_id=data["model_id"],
                checkpoint=data["checkpoint"],
                dim=data["dim"],
                committed="before versions",
            )
        )
    return {
        "tables": tables,
        "versions": versions,
        "next_version": len(versions) + 1,
        "format_version": FORMAT_VERSION,
    }


def _version_order(vid: str) -> tuple[int, str]:
    return (int(vid[1:]) if vid[1:].isdigit() else 0, vid)


def _relative(db: str | Path, checkpoint: str | Path) -> str:
    return os.path.relpath(Path(checkpoint).absolute(), Path(db).absolute())


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_table_name(name: str) -> str:
    if not _TABLE_NAME.fullmatch(name):
        raise InputDataError(
            f"table name {name!r} is not allowed: use letters, digits, '_' or '-' (at most 64, "
            "starting with a letter or digit)"
        )
    return name


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing), waiting for other holders.

    An flock belongs to one open file, so it excludes threads of one process as well as other
    processes, and a killed holder releases it.
    """
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def manifest_lock(db: str | Path) -> Iterator[None]:
    """Hold the short lock under which a process reads, changes and writes the manifest."""
    Path(db).mkdir(parents=True, exist_ok=True)
    with file_lock(Path(db) / _MANIFEST_LOCK):
        yield


@contextlib.contextmanager
def write_lock(db: str | Path, what: str) -> Iterator[None]:
    """Hold the database's writer lock for a whole indexing run (or a version removal).

    A second writer is refused at once, with the holder's pid and task: two runs would interleave
    their plans. The lock is an flock, so a killed holder releases it.
    """
    created = not Path(db).exists()
    Path(db).mkdir(parents=True, exist_ok=True)
    path = Path(db) / _WRITE_LOCK
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise InputDataError(
                f"{db} is being written by {holder}; wait for it to finish (one writer per "
                "database at a time)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({what}, since {now_utc()})")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
        if created and {p.name for p in Path(db).iterdir()} <= {_WRITE_LOCK, _MANIFEST_LOCK}:
            shutil.rmtree(db, ignore_errors=True)  # a refused first run leaves nothing behind
