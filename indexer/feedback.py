"""Relevance feedback: "this hit is (not) relevant to this query", stored in the database.

One SQLite file per database, ``<db>/feedback.sqlite3`` (WAL, so the app can write while a loop
exports). A label is one row: the query (a text, or an indexed item's sha256 with its table), the
hit (its sha256 and table), +1 (relevant) or -1 (not relevant), the model id (and table version,
when known) that showed the hit, and the time. A new label for the same (query, hit) replaces
the old one; labels survive restarts and re-indexing (items are named by content hash).

:meth:`FeedbackStore.export` turns the labels into a training manifest (JSONL, read by
:func:`beit3.data.read_pairs`): a row per relevant (image, text) pair, carrying the images marked
not relevant for that text as ``negatives`` (hard negatives for :mod:`training`)::

    {"image": "/photos/cat.jpg", "text": "a cat on a sofa",
     "negatives": ["/photos/dog.jpg"], "hit_id": "3f2a...", "table": "images"}
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from beit3.errors import InputDataError
from indexer.manifest import file_lock

__all__ = ["FEEDBACK_NAME", "ExportSummary", "FeedbackLabel", "FeedbackStore"]

FEEDBACK_NAME = "feedback.sqlite3"
RELEVANT, NOT_RELEVANT = 1, -1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    query_text   TEXT NOT NULL DEFAULT '',  -- a text query ('' for an item query)
    query_id     TEXT NOT NULL DEFAULT '',  -- an item query: the item's sha256
    query_table  TEXT NOT NULL DEFAULT '',  -- ... and its table
    query_path   TEXT,                      -- an image item query: its file
    hit_table    TEXT NOT NULL,
    hit_id       TEXT NOT NULL,             -- the hit's sha256
    hit_path     TEXT,                      -- an image hit's file
    hit_text     TEXT,                      -- a text hit's text
    label        INTEGER NOT NULL CHECK (label IN (-1, 1)),
    model_id     TEXT NOT NULL,
    version      TEXT,
    created      TEXT NOT NULL,
    PRIMARY KEY (query_text, query_id, query_table, hit_table, hit_id)
);
"""
_COLUMNS = (
    "query_text, query_id, query_table, query_path, hit_table, hit_id, hit_path, hit_text, "
    "label, model_id, version, created"
)


@dataclass(frozen=True)
class FeedbackLabel:
    """One stored label. A text query has ``query_text``; an item query ``query_id`` (sha256)
    and ``query_table`` (and ``query_path`` for an image). ``label``: +1 relevant, -1 not."""

    hit_table: str
    hit_id: str
    label: int
    model_id: str
    created: str
    query_text: str = ""
    query_id: str = ""
    query_table: str = ""
    query_path: str | None = None
    hit_path: str | None = None
    hit_text: str | None = None
    version: str | None = None

    @property
    def query(self) -> str:
        """The query as a person reads it: the text, or ``table:sha256[:12]``."""
        return self.query_text or f"{self.query_table}:{self.query_id[:12]}"


@dataclass(frozen=True)
class ExportSummary:
    """What :meth:`FeedbackStore.export` wrote: ``rows`` training pairs carrying ``negatives``
    hard negatives in all (from ``queries`` distinct queries), and the labels it could not use,
    counted by reason."""

    path: Path
    rows: int
    negatives: int
    queries: int
    skipped: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return (
            f"{self.path}: {self.rows} pairs with {self.negatives} hard negatives from "
            f"{self.queries} queries" + (f"; skipped {skipped}" if skipped else "")
        )


class FeedbackStore:
    """The feedback labels of the database ``db`` (``<db>/feedback.sqlite3``).

    Every call opens its own connection, so one store may be shared by threads (Streamlit) and
    several processes may write at once (SQLite WAL, 10 s busy timeout).

    Raises:
        InputDataError: ``db`` is not a directory.
    """

    def __init__(self, db: str | Path) -> None:
        self.db = Path(db)
        if not self.db.is_dir():
            raise InputDataError(f"{db}: no such database directory (index something first)")
        self.path = self.db / FEEDBACK_NAME
        # Switching to WAL needs an exclusive lock and SQLite answers "database is locked" at once,
        # without its busy timeout, when another connection holds one: stores opened together
        # (threads, processes) take turns here, and one already in WAL mode is left alone.
        with file_lock(self.db / f"{FEEDBACK_NAME}.lock"), self._connect() as conn:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            with conn:  # commits, or rolls back on an exception
                yield conn
        except sqlite3.DatabaseError as exc:
            raise InputDataError(f"{self.path}: {exc}; delete the file to start over") from None
        finally:
            conn.close()

    def add(
        self,
        *,
        hit_table: str,
        hit_id: str,
        label: int,
        model_id: str,
        query_text: str = "",
        query_id: str = "",
        query_table: str = "",
        query_path: str | None = None,
        hit_path: str | None = None,
        hit_text: str | None = None,
        version: str | None = None,
    ) -> FeedbackLabel:
        """Store a label (replacing an earlier one for the same query and hit).

        Args:
            hit_table, hit_id: the hit (table name, content sha256).
            label: +1 (relevant) or -1 (not relevant).
            model_id: the model whose ranking showed the hit.
            query_text: a text query, or
            query_id, query_table: an indexed item used as the query (``query_path``: its file).
            hit_path, hit_text: the hit's file (images) or text (texts), for the export.
            version: the table version that served the hit, when known.

        Raises:
            InputDataError: a label other than +1 / -1, or not exactly one kind of query.
        """
        text = " ".join(query_text.split())
        if label not in (RELEVANT, NOT_RELEVANT) or isinstance(label, bool):
            raise InputDataError(f"feedback label must be 1 (relevant) or -1, got {label!r}")
        if bool(text) == bool(query_id) or bool(query_id) != bool(query_table):
            raise InputDataError(
                "feedback needs either query_text, or query_id with its query_table; got "
                f"query_text={query_text!r}, query_id={query_id!r}, query_table={query_table!r}"
            )
        if not hit_table or not hit_id or not model_id:
            raise InputDataError(
                f"feedback needs hit_table, hit_id and model_id; got {hit_table!r}, {hit_id!r}, "
                f"{model_id!r}"
            )
        row = FeedbackLabel(
            hit_table=hit_table,
            hit_id=hit_id,
            label=label,
            model_id=model_id,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            query_text=text,
            query_id=query_id,
            query_table=query_table,
            query_path=query_path,
            hit_path=hit_path,
            hit_text=hit_text,
            version=version,
        )
        with self._connect() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO labels ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                tuple(getattr(row, name.strip()) for name in _COLUMNS.split(",")),
            )
        return row

    def remove(
        self,
        *,
        hit_table: str,
        hit_id: str,
        query_text: str = "",
        query_id: str = "",
        query_table: str = "",
    ) -> bool:
        """Forget the label of one (query, hit); True if there was one."""
        with self._connect() as conn:
            cursor = conn.execute(
                "DELETE FROM labels WHERE query_text=? AND query_id=? AND query_table=? "
                "AND hit_table=? AND hit_id=?",
                (" ".join(query_text.split()), query_id, query_table, hit_table, hit_id),
            )
        return cursor.rowcount > 0

    def labels(
        self,
        *,
        hit_table: str | None = None,
        query_text: str | None = None,
        query_id: str | None = None,
        model_id: str | None = None,
    ) -> list[FeedbackLabel]:
        """The stored labels (oldest first), optionally only those of a hit table, a query or
        a model."""
        where, values = [], []
        for column, value in (
            ("hit_table", hit_table),
            ("query_text", None if query_text is None else " ".join(query_text.split())),
            ("query_id", query_id),
            ("model_id", model_id),
        ):
            if value is not None:
                where.append(f"{column}=?")
                values.append(value)
        sql = f"SELECT {_COLUMNS} FROM labels"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY created, rowid", values).fetchall()
        names = [name.strip() for name in _COLUMNS.split(",")]
        return [FeedbackLabel(**dict(zip(names, row, strict=True))) for row in rows]

    def count(self, hit_table: str | None = None) -> int:
        with self._connect() as conn:
            if hit_table is None:
                return int(conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0])
            sql = "SELECT COUNT(*) FROM labels WHERE hit_table=?"
            return int(conn.execute(sql, (hit_table,)).fetchone()[0])

    def clear(self, hit_table: str | None = None) -> int:
        """Delete every label (of one hit table); returns how many."""
        with self._connect() as conn:
            if hit_table is None:
                return conn.execute("DELETE FROM labels").rowcount
            return conn.execute("DELETE FROM labels WHERE hit_table=?", (hit_table,)).rowcount

    def export(
        self, path: str | Path, *, hit_table: str | None = None, model_id: str | None = None
    ) -> ExportSummary:
        """Write the labels as a training manifest (JSONL; atomically).

        - a text query with image hits: a row per relevant image, ``{"image", "text",
          "negatives": [images marked not relevant for that text]}``;
        - an image item query with text hits: a row per relevant text (the query image and it);
        - anything else is skipped and counted by reason: a text query with no relevant image
          (its negatives need a positive to be contrasted with), an image missing from disk, a
          text-to-text or image-to-image label.

        Returns:
            :class:`ExportSummary`.
        """
        groups: dict[tuple[str, str], tuple[list[FeedbackLabel], list[FeedbackLabel]]] = {}
        skipped: Counter[str] = Counter()
        for row in self.labels(hit_table=hit_table, model_id=model_id):
            if row.query_text and row.hit_path:
                key = ("text", row.query_text)
            elif row.query_path and row.hit_text is not None:
                key = ("image", row.query_path)
            else:
                skipped["labels of an image-to-image or text-to-text query"] += 1
                continue
            positives, negatives = groups.setdefault(key, ([], []))
            (positives if row.label == RELEVANT else negatives).append(row)
        lines: list[dict[str, object]] = []
        total_negatives, queries = 0, 0
        for (kind, query), (positives, negatives) in groups.items():
            if kind == "image":  # an image query: its relevant texts are pairs
                if not os.path.isfile(query):
                    skipped["labels whose image is missing"] += len(positives) + len(negatives)
                    continue
                skipped["not-relevant texts (text negatives are not trained)"] += len(negatives)
                queries += bool(positives)
                for row in positives:
                    lines.append({"image": query, "text": row.hit_text, "hit_id": row.hit_id})
                continue
            present = [r for r in positives if r.hit_path and os.path.isfile(r.hit_path)]
            negative_paths = [r.hit_path for r in negatives if os.path.isfile(r.hit_path or "")]
            gone = len(positives) - len(present) + len(negatives) - len(negative_paths)
            if gone:
                skipped["labels whose image is missing"] += gone
            if not present:
                skipped["not-relevant labels of a query with no relevant hit"] += len(
                    negative_paths
                )
                continue
            queries += 1
            for row in present:
                lines.append(
                    {
                        "image": row.hit_path,
                        "text": query,
                        "negatives": negative_paths,
                        "hit_id": row.hit_id,
                        "table": row.hit_table,
                    }
                )
                total_negatives += len(negative_paths)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
        partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
        os.replace(partial, out)
        return ExportSummary(out, len(lines), total_negatives, queries, dict(skipped))
