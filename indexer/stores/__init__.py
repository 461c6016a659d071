"""Vector stores behind one interface: LanceDB (the embedded default) and FAISS.

Only this package imports ``lancedb`` / ``faiss``, lazily and with an install hint, so that the
rest of the indexer (and the app) import without them.

A store holds one *table*: one row per distinct content (keyed by its sha256), with the columns of
:data:`ROW_COLUMNS`. Every path (or text reference) with that content is kept in ``paths``, so exact
duplicates are embedded once.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from beit3.errors import InputDataError

__all__ = [
    "BACKENDS",
    "FAISS_INDEX_TYPES",
    "META_COLUMNS",
    "ROW_COLUMNS",
    "Match",
    "Store",
    "drop_store",
    "open_store",
    "row_schema",
    "rows_from_vectors",
]

BACKENDS = ("lancedb", "faiss")
FAISS_INDEX_TYPES = ("flat", "hnsw", "ivfpq")

# sha256: content hash (the key); path: a representative path (None for texts); paths: every
# path / text reference with this content, sorted, and mtimes parallel to it; size in bytes (of the
# file, or of the UTF-8 text); mtime of the representative.
ROW_COLUMNS = (
    "sha256",
    "vector",
    "modality",
    "path",
    "paths",
    "mtimes",
    "text",
    "size",
    "mtime",
    "model_id",
    # keyword search and filters (indexer.facts); tables built before them lack these
    "search_text",
    "ext",
    "width",
    "height",
    "taken",
    "camera",
)
META_COLUMNS = tuple(c for c in ROW_COLUMNS if c != "vector")


def row_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("modality", pa.string()),
            pa.field("path", pa.string()),
            pa.field("paths", pa.list_(pa.string())),
            pa.field("mtimes", pa.list_(pa.float64())),
            pa.field("text", pa.string()),
            pa.field("size", pa.int64()),
            pa.field("mtime", pa.float64()),
            pa.field("model_id", pa.string()),
            pa.field("search_text", pa.string()),
            pa.field("ext", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("taken", pa.float64()),
            pa.field("camera", pa.string()),
        ]
    )


def rows_from_vectors(meta: Sequence[dict[str, Any]], vectors: np.ndarray, dim: int) -> pa.Table:
    """Build a row table from metadata dicts (keys of META_COLUMNS) and (N, dim) float32 vectors."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    assert vectors.shape == (len(meta), dim), f"vectors {vectors.shape} vs {len(meta)} x {dim}"
    schema = row_schema(dim)
    columns: dict[str, Any] = {name: [m.get(name) for m in meta] for name in META_COLUMNS}
    columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    return pa.table({name: columns[name] for name in ROW_COLUMNS}, schema=schema)


def import_optional(module: str, package: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the {module!r} backend needs the package {package!r}: pip install {package} ({exc})"
        ) from None


class Match(NamedTuple):
    """One search result: cosine similarity and the row's metadata (META_COLUMNS)."""

    score: float
    row: dict[str, Any]


class Store(abc.ABC):
    """One table of vectors with its metadata.

    Writers call :meth:`append` / :meth:`upsert` / :meth:`delete` in chunks (each durable on return)
    and :meth:`commit` at the end; readers call :meth:`search`, :meth:`fetch` and :meth:`count`.
    """

    backend: str
    name: str
    dim: int

    @abc.abstractmethod
    def count(self) -> int:
        """Number of rows (distinct contents) committed."""

    @abc.abstractmethod
    def read_meta(self) -> pa.Table:
        """Every row without the vector: the columns of META_COLUMNS."""

    @abc.abstractmethod
    def fetch(self, shas: Sequence[str], with_vectors: bool = True) -> pa.Table:
        """Rows whose sha256 is in ``shas`` (any order; unknown keys are left out)."""

    @abc.abstractmethod
    def append(self, rows: pa.Table) -> None:
        """Add rows whose keys are new. Durable on return; safe from several processes at once."""

    @abc.abstractmethod
    def upsert(self, rows: pa.Table) -> None:
        """Insert rows, or replace the rows with the same sha256."""

    @abc.abstractmethod
    def delete(self, shas: Sequence[str]) -> None:
        """Remove the rows with these keys."""

    def recover(self) -> None:  # noqa: B027 - optional hook
        """Finish the work a killed writer left behind (called before planning a run)."""

    def commit(self) -> None:  # noqa: B027 - optional hook
        """Make the writes searchable (FAISS builds its index here)."""

    def snapshot(self) -> int | None:
        """An id of the state the store holds now, which :meth:`pin` can return to (Lance's
        table version); None when the store has no such history (FAISS: a reader sees whole
        commits anyway)."""
        return None

    def pin(self, snapshot: int | None) -> None:  # noqa: B027 - optional hook
        """Make reads see the state ``snapshot`` (None: the latest)."""

    @abc.abstractmethod
    def search(
        self, vectors: np.ndarray, k: int, offset: int = 0, where: str | None = None
    ) -> list[list[Match]]:
        """(Q, dim) unit vectors -> per query, up to ``k`` rows after skipping ``offset``.

        ``where``: an SQL predicate over the row columns, applied before ranking."""

    def missing_columns(self) -> list[str]:
        """ROW_COLUMNS this table was built without (an index made before they existed)."""
        return []

    def check_columns(self, what: str) -> None:
        """Raise the re-index message when this table predates the columns ``what`` needs."""
        if self.missing_columns():
            raise InputDataError(
                f"table {self.name!r} was indexed before {what} existed (it has no "
                f"{', '.join(self.missing_columns())} column); re-run beit3 index on the same "
                "sources to add them (vectors are kept, nothing is re-embedded)"
            )

    def migrate(self, fill: Any) -> None:  # noqa: B027 - optional hook
        """Add the missing columns to every row: ``fill(row) -> {column: value}``."""

    def search_keyword(
        self, text: str, k: int, offset: int = 0, where: str | None = None
    ) -> list[Match]:
        """Full-text (BM25) search of the ``search_text`` column; Match.score is the BM25 score."""
        raise InputDataError(self._lacks("keyword search"))

    def search_hybrid(
        self,
        vector: np.ndarray,
        text: str,
        k: int,
        offset: int = 0,
        where: str | None = None,
        rrf_k: int = 60,
        candidates: int = 0,
    ) -> list[Match]:
        """Reciprocal rank fusion of the vector and keyword rankings, each cut at its top
        max(k + offset, candidates); Match.score is the fused sum(1 / (rrf_k + rank)), rank
        from 1."""
        raise InputDataError(self._lacks("hybrid search"))

    def _lacks(self, what: str) -> str:
        return (
            f"table {self.name!r} is a {self.backend} table, which has no {what} (only plain "
            "vector search); index into the default LanceDB backend (beit3 index ... --backend lancedb "
            "--table NEW) for keyword, hybrid and filtered search"
        )


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputDataError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def open_store(
    db: Path,
    table: str,
    backend: str,
    *,
    dim: int,
    create: bool = False,
    index_type: str | None = None,
) -> Store:
    """Open (or with ``create``, create) the table ``table`` of the database directory ``db``."""
    check_backend(backend)
    if backend == "lancedb":
        from indexer.stores.lance_store import LanceStore

        return LanceStore(db, table, dim=dim, create=create, index_type=index_type)
    from indexer.stores.faiss_store import FaissStore

    return FaissStore(db, table, dim=dim, create=create, index_type=index_type or "flat")


def drop_store(db: Path, table: str, backend: str) -> None:
    """Delete a store and its files (a removed version)."""
    check_backend(backend)
    if backend == "lancedb":
        lancedb = import_optional("lancedb", "lancedb")
        conn = lancedb.connect(str(Path(db) / "lancedb"))
        with contextlib.suppress(ValueError, FileNotFoundError):  # already gone
            conn.drop_table(table)
        return
    import shutil

    shutil.rmtree(Path(db) / "faiss" / table, ignore_errors=True)
