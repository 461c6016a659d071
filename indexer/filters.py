"""Search filters: typed conditions on the stored row columns, turned into one SQL predicate that
the store applies before ranking (a prefilter: the top k are the k best *matching* rows).

Columns (see ``indexer.stores.ROW_COLUMNS``): ``path`` (the representative path of a content),
``ext`` (lower case, no dot), ``mtime`` (epoch seconds), ``width`` / ``height`` (pixels, as
displayed), ``taken`` (EXIF date taken, camera local time read as UTC, epoch seconds; NULL
without EXIF) and ``camera`` (EXIF "Make Model"; NULL without EXIF).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, fields
from pathlib import Path

from beit3.errors import InputDataError

__all__ = ["Filters", "parse_time"]

Time = float | int | str | datetime.date | datetime.datetime
_ALIASES = {"jpg": ("jpg", "jpeg"), "jpeg": ("jpg", "jpeg"), "tif": ("tif", "tiff")}


def parse_time(value: Time, name: str) -> float:
    """A date (``2024-05-01``), a date-time (``2024-05-01T13:00``, UTC unless it says), a
    ``datetime`` or epoch seconds -> epoch seconds. ``name`` is the option, for the message."""
    if isinstance(value, bool):
        raise InputDataError(f"{_option(name)}: expected a date, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, datetime.date):
        moment = datetime.datetime(value.year, value.month, value.day)
    else:
        try:
            moment = datetime.datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise InputDataError(
                f"{_option(name)}: cannot read {value!r} as a date; use YYYY-MM-DD or "
                "YYYY-MM-DDTHH:MM[:SS]"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True, kw_only=True)
class Filters:
    """Conditions a hit must meet; all given ones must hold. Bounds are inclusive.

    Args:
        under: folders; one of a hit's paths (any copy of its content) lies in one of them
            (any depth).
        types: file extensions (``jpg``, ``.PNG``; ``jpg`` also matches ``jpeg``).
        modified_after, modified_before: file mtime bounds (dates, ISO date-times, epoch s).
        min_width, max_width, min_height, max_height: image size in pixels.
        taken_after, taken_before: EXIF date-taken bounds (files without one never match).
        camera: a case-insensitive part of the EXIF "Make Model" (``canon``, ``iphone 13``).
        where: a raw SQL predicate over the columns (LanceDB / DataFusion syntax), ANDed.
    """

    under: tuple[str | Path, ...] = ()
    types: tuple[str, ...] = ()
    modified_after: Time | None = None
    modified_before: Time | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    taken_after: Time | None = None
    taken_before: Time | None = None
    camera: str | None = None
    where: str | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) in (None, ()) for f in fields(self))

    def to_sql(self) -> str | None:
        """The SQL predicate, or None when there is no condition.

        Raises:
            InputDataError: a bad value; the message names the option.
        """
        parts = []
        if self.under:
            folders = [
                os.path.abspath(os.path.expanduser(str(f))).rstrip(os.sep) for f in self.under
            ]
            # Any path of the content (an exact duplicate in another folder counts): every path,
            # each after a newline, searched for a newline + the folder.
            every = "concat(chr(10), array_to_string(paths, chr(10)))"
            parts.append(
                "("
                + " OR ".join(
                    f"strpos({every}, concat(chr(10), {_quote(f + os.sep)})) > 0" for f in folders
                )
                + ")"
            )
        if self.types:
            exts: list[str] = []
            for given in self.types:
                ext = given.strip().lower().lstrip(".")
                if not ext or not ext.isalnum():
                    raise InputDataError(
                        f"--type: {given!r} is not a file extension; use e.g. jpg, png, webp"
                    )
                exts.extend(_ALIASES.get(ext, (ext,)))
            parts.append(f"ext IN ({', '.join(_quote(e) for e in dict.fromkeys(exts))})")
        for name, column, op in (
            ("modified_after", "mtime", ">="),
            ("modified_before", "mtime", "<="),
            ("taken_after", "taken", ">="),
            ("taken_before", "taken", "<="),
        ):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{column} {op} {parse_time(value, name)!r}")
        for name, column, op in (
            ("min_width", "width", ">="),
            ("max_width", "width", "<="),
            ("min_height", "height", ">="),
            ("max_height", "height", "<="),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputDataError(f"{_option(name)}: expected pixels >= 0, got {value!r}")
            parts.append(f"{column} {op} {value}")
        if self.camera is not None:
            if not self.camera.strip():
                raise InputDataError("--camera: empty; give part of a camera name (e.g. canon)")
            parts.append(f"strpos(lower(camera), {_quote(self.camera.strip().lower())}) > 0")
        if self.where is not None:
            if not self.where.strip():
                raise InputDataError('--where: empty predicate; e.g. --where "size > 100000"')
            parts.append(f"({self.where})")
        return " AND ".join(parts) if parts else None

    @property
    def uses_new_columns(self) -> bool:
        """Whether a condition needs the columns that tables indexed before filters lack."""
        return any(
            getattr(self, f.name) not in (None, ())
            for f in fields(self)
            if f.name not in ("under", "modified_after", "modified_before", "where")
        )
