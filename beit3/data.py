"""The one reader of every input kind: image-text pairs, images and texts.

Sources:
- a manifest: JSONL (one object per line), JSON (an array of objects, or one object per line),
  CSV or TSV (a header row); image paths are relative to the manifest; extra columns are ignored;
- a folder of images where ``cat.jpg`` has its captions in ``cat.txt``, one per line;
- a plain text file, one text per line (texts only; blank lines separate texts, they are not rows);
- WebDataset tar shards (``shard-000.tar``, a folder of them, or ``shards-{000..009}.tar``): files
  sharing a key (``0001.jpg`` + ``0001.txt``/``0001.json``) form a sample; streamed, never unpacked.

Columns: the image is the first of :data:`IMAGE_COLUMNS`, the text the first of
:data:`TEXT_COLUMNS` that the CSV header (or the first JSON row that has one) holds, unless the
caller names the column. A text value may be a list of captions; whitespace runs become one space.

Bad rows never stop a read: each is skipped with a reason, ``(where, reason)`` with ``where`` as
``file:line`` (``shard:key`` in a shard, the image path in a folder), and logged as one WARNING line
``skipped <where>: <reason>`` (the indexer lists them in its run report, in the same form). Only a
source that does not exist, a CSV header without a needed column, or a source that yields nothing
usable to :func:`read_pairs` / :func:`list_images` raises :class:`~beit3.errors.InputDataError`.

A pair record per (image, caption), as the official code iterates over captions. The torch
datasets over these records (pairs, shards, text lines, image files) are in :mod:`beit3.datasets`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tarfile
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from beit3.errors import InputDataError

__all__ = [
    "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "TEXT_COLUMNS",
    "PairRecord",
    "Row",
    "Skip",
    "expand_shards",
    "group_by_image",
    "iter_shard_samples",
    "is_shard_source",
    "list_images",
    "log_skipped",
    "read_captions",
    "read_pairs",
    "read_rows",
    "read_shard_sample",
    "read_texts",
    "walk_images",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".jsonl", ".json", ".csv", ".tsv"})
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "filepath", "img")
TEXT_COLUMNS = ("text", "caption", "captions", "texts", "sentence", "name", "title")
_BOM = b"\xef\xbb\xbf"

Skip = tuple[str, str]
"""A skipped row or file: (``file:line`` or path, a one-line reason)."""

RowKind = Literal["pair", "image", "text"]


class Row(NamedTuple):
    """A usable row: where it is (``file:line``; an image path in a folder), its image (an
    absolute path; None in a text row) and its texts (normalised, non-empty; may be empty in an
    image row, where they are labels)."""

    where: str
    image: str | None
    texts: tuple[str, ...]


@dataclass(frozen=True)
class PairRecord:
    """One (image, caption) pair. ``image_id`` groups the captions of one image."""

    image: str
    text: str
    image_id: str


# Entry points ------------------------------------------------------------------------------


def read_rows(
    source: str | Path,
    kind: RowKind,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    skipped: list[Skip],
) -> Iterator[Row]:
    """The usable rows of a manifest, a caption folder or (``kind="text"``) a plain text file.

    Args:
        source: the file or folder.
        kind: what a row needs: ``"pair"`` an image and a text; ``"image"`` an image (texts, when
            the row has them, come along as labels); ``"text"`` a text (a bare JSON string is one).
        image_column, text_column: the column names; default: the first of IMAGE_COLUMNS /
            TEXT_COLUMNS present.
        skipped: receives a ``(where, reason)`` per bad row; nothing is logged here, the caller
            reports them (see :func:`read_pairs`).

    Raises:
        InputDataError: the source does not exist or is of a type this kind cannot read, or a
            CSV header lacks a needed column.
    """
    path = Path(os.path.abspath(source))
    fields = _Fields(path.parent, kind, image_column, text_column)
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _folder_rows(path, kind, skipped)
    elif not path.is_file():
        raise InputDataError(f"{source}: no such file or folder")
    elif suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, fields, skipped)
    elif suffix in (".jsonl", ".json"):
        for where, record in _json_records(path, skipped):
            row = fields.row(where, record)
            if isinstance(row, str):
                skipped.append((where, row))
            else:
                yield row
    elif kind == "text":
        if text_column is not None:
            raise InputDataError(
                f"{source}: a text column applies to JSONL/JSON/CSV/TSV files; this file is "
                "read as plain text, one text per line"
            )
        yield from _line_rows(path, skipped)
    else:
        raise InputDataError(
            f"{source}: unknown manifest type {path.suffix!r}; use .jsonl, .json, .csv, .tsv, a "
            "folder of images with .txt captions, or WebDataset .tar shards"
        )


def read_pairs(
    source: str | Path,
    image_column: str | None = None,
    text_column: str | None = None,
) -> list[PairRecord]:
    """Pairs of a manifest or a caption folder: a record per (image, caption); skips logged.

    Raises:
        InputDataError: the source does not exist, or it holds no usable pair (the skipped
            rows are logged before, each with its reason).
    """
    skipped: list[Skip] = []
    records = [
        PairRecord(row.image, text, row.image)
        for row in read_rows(
            source, "pair", image_column=image_column, text_column=text_column, skipped=skipped
        )
        if row.image is not None
        for text in row.texts
    ]
    log_skipped(skipped)
    if not records:
        raise InputDataError(
            f"{source}: no usable image-text pairs (every row lacked an image or text)"
        )
    logger.info(
        "%s: %d pairs of %d images (%d rows skipped)",
        source,
        len(records),
        len({r.image_id for r in records}),
        len(skipped),
    )
    return records


def read_texts(source: str | Path, column: str | None = None) -> Iterator[str]:
    """Texts of a plain text file (one per line), a manifest's text column or a caption
    folder, in order; skips are logged when the iteration ends."""
    skipped: list[Skip] = []
    try:
        for row in read_rows(source, "text", text_column=column, skipped=skipped):
            yield from row.texts
    finally:
        log_skipped(skipped)


def read_captions(
    source: str | Path, image_column: str | None = None, text_column: str | None = None
) -> Iterator[str]:
    """Every caption of a pair source (a manifest, a caption folder or WebDataset shards), as
    training reads it (e.g. to train a tokenizer on)."""
    if not is_shard_source(source):
        for record in read_pairs(source, image_column, text_column):
            yield record.text
        return
    for shard in expand_shards(source):
        for key, files in iter_shard_samples(shard):
            sample = read_shard_sample(files)
            if isinstance(sample, str):
                log_skipped([(f"{shard}:{key}", sample)])
            else:
                yield from sample[1]


def list_images(source: str | Path, image_column: str | None = None) -> list[str]:
    """The distinct images of a folder (every image in it) or a manifest, as absolute paths.

    Raises:
        InputDataError: the source does not exist or holds no image.
    """
    skipped: list[Skip] = []
    if Path(source).is_dir():
        images = walk_images(source, skipped)
    else:
        rows = read_rows(source, "image", image_column=image_column, skipped=skipped)
        images = list(dict.fromkeys(row.image for row in rows if row.image is not None))
    log_skipped(skipped)
    if not images:
        raise InputDataError(f"{source}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def walk_images(folder: str | Path, skipped: list[Skip]) -> list[str]:
    """Image files under ``folder``, recursively, as sorted absolute paths.

    Hidden names (a leading dot) are skipped, extensions match in any case; an unreadable
    folder goes to ``skipped``.
    """
    root = os.path.abspath(folder)
    files = []

    def onerror(exc: OSError) -> None:
        skipped.append((exc.filename or root, f"unreadable folder ({exc.strerror})"))

    for parent, dirs, names in os.walk(root, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(os.path.join(parent, name))
    return files


def is_shard_source(source: str | Path) -> bool:
    """True for WebDataset shards: a ``.tar`` file, a ``{000..009}`` pattern, or a folder that
    holds ``.tar`` files (a folder of images is a caption folder instead)."""
    text = str(source)
    if text.endswith(".tar") or ("{" in text and ".tar" in text):
        return True
    path = Path(text)
    return path.is_dir() and any(path.glob("*.tar"))


def group_by_image(records: Sequence[PairRecord]) -> tuple[list[str], list[str], list[int]]:
    """Split pairs for evaluation: unique images, all texts, and each text's image index."""
    index: dict[str, int] = {}
    images: list[str] = []
    texts: list[str] = []
    owner: list[int] = []
    for r in records:
        if r.image_id not in index:
            index[r.image_id] = len(images)
            images.append(r.image)
        texts.append(r.text)
        owner.append(index[r.image_id])
    return images, texts, owner


def log_skipped(skipped: Iterable[Skip]) -> None:
    """One WARNING line ``skipped <where>: <reason>`` per skipped row."""
    for where, reason in skipped:
        logger.warning("skipped %s: %s", where, reason)


# Rows of each kind of source ---------------------------------------------------------------


class _Column:
    """A column chosen once: the caller's name, or the first candidate a record holds."""

    def __init__(self, what: str, candidates: tuple[str, ...], name: str | None) -> None:
        self.what, self.candidates, self.name = what, candidates, name
        self.is_named = name is not None

    def pick(self, keys: Container[Any]) -> str | None:
        """The column if ``keys`` (a record or a header) holds it; the first call that finds a
        candidate chooses it for the rest of the file."""
        if self.name is None:
            self.name = next((c for c in self.candidates if c in keys), None)
        return self.name if self.name is not None and self.name in keys else None

    def missing(self) -> str:
        if self.name is None:
            return (
                f"no {self.what} column (none of {', '.join(self.candidates)}; name the column "
                "to use)"
            )
        return f"no {self.what} column {self.name!r}"


class _BadRow(Exception):
    """A row that cannot be used; the message is the reason."""


class _Fields:
    """Turns a record (a JSON value, or a CSV row as a dict) into a Row or a skip reason."""

    def __init__(
        self, root: Path, kind: RowKind, image_column: str | None, text_column: str | None
    ) -> None:
        self.root, self.kind = str(root), kind
        self.image = _Column("image", IMAGE_COLUMNS, image_column)
        self.text = _Column("text", TEXT_COLUMNS, text_column)

    def check_header(self, path: Path, header: Sequence[str]) -> None:
        """A CSV header decides the columns: a needed (or named) one that is missing raises."""
        needed = [] if self.kind == "text" else [self.image]
        if self.kind != "image" or self.text.is_named:
            needed.append(self.text)
        for column in needed:
            if column.pick(header) is None:
                raise InputDataError(
                    f"{path}: {column.missing()}; its columns are {', '.join(header) or 'none'}"
                )
        self.text.pick(header)

    def row(self, where: str, record: Any) -> Row | str:
        """The row of ``record``, or the reason it is skipped."""
        try:
            return self._row(where, record)
        except _BadRow as exc:
            return str(exc)

    def _row(self, where: str, record: Any) -> Row:
        if self.kind == "text" and isinstance(record, str) and not self.text.is_named:
            return Row(where, None, _texts(record, ""))
        if not isinstance(record, dict):
            raise _BadRow(f"expected a JSON object, got {type(record).__name__}")
        image = None
        if self.kind != "text":
            key = self.image.pick(record)
            if key is None:
                raise _BadRow(self.image.missing())
            image = _image_path(record[key], key, self.root)
        try:
            key = self.text.pick(record)
            if key is None:
                raise _BadRow(self.text.missing())
            texts = _texts(record[key], key)
        except _BadRow:
            if self.kind != "image":
                raise
            texts = ()  # an image row's label is optional
        return Row(where, image, texts)


def _image_path(value: Any, key: str, root: str) -> str:
    """The absolute path of an image value (relative to ``root``).

    Raises:
        _BadRow: the value is not a usable path.
    """
    if value is None:
        raise _BadRow(f"no value in column {key!r}")
    if not isinstance(value, str):
        raise _BadRow(f"column {key!r} is {type(value).__name__}, not a string")
    value = value.strip()
    if not value:
        raise _BadRow("empty image path")
    if not _is_utf8(value):
        raise _BadRow("invalid UTF-8")
    return os.path.abspath(os.path.join(root, value))


def _texts(value: Any, key: str) -> tuple[str, ...]:
    """The non-empty, whitespace-normalised captions of a text value (a string or a list).

    Raises:
        _BadRow: there are none.
    """
    if value is None:
        raise _BadRow(f"no value in column {key!r}")
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise _BadRow(f"column {key!r} is {type(value).__name__}, not a string")
    texts = tuple(t for t in (" ".join(v.split()) for v in values if isinstance(v, str)) if t)
    if not all(_is_utf8(t) for t in texts):
        raise _BadRow("invalid UTF-8")
    if not texts:
        raise _BadRow("empty text")
    return texts


def _is_utf8(text: str) -> bool:
    """False for text holding surrogates (undecodable bytes kept by ``surrogateescape``, or a
    lone ``\\ud800`` escape in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode(data: bytes, where: str, skipped: list[Skip]) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        skipped.append(
            (where, f"invalid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start + 1})")
        )
        return None


def _json_records(path: Path, skipped: list[Skip]) -> Iterator[tuple[str, Any]]:
    """(``file:line``, value) per record of a JSONL file or a JSON array (a ``.json`` file
    that starts with ``[``; otherwise it is read as JSON lines)."""
    if path.suffix.lower() == ".json":
        with path.open("rb") as f:
            head = f.read(4096).removeprefix(_BOM).lstrip()
        if head.startswith(b"["):
            yield from _json_array(path, skipped)
            return
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            line = _decode(raw.removeprefix(_BOM) if number == 1 else raw, where, skipped)
            if line is None or not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                skipped.append((where, f"invalid JSON ({exc.msg})"))


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array(path: Path, skipped: list[Skip]) -> Iterator[tuple[str, Any]]:
    """The elements of a JSON array, each with the line it starts on. A syntax error ends the
    array: the rest of the file is skipped, with one reason."""
    text = path.read_bytes().removeprefix(_BOM).decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, text.index("[") + 1).end()  # type: ignore[union-attr]
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            skipped.append(
                (f"{path}:{exc.lineno}", f"invalid JSON ({exc.msg}); the rest of the file skipped")
            )
            return
        yield f"{path}:{line}", value
        pos = _SPACE.match(text, end).end()  # type: ignore[union-attr]
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        elif not text.startswith("]", pos):
            where = f"{path}:{line + text.count(chr(10), counted, pos)}"
            skipped.append(
                (where, "invalid JSON (expected ',' or ']'); the rest of the file skipped")
            )
            return


def _csv_rows(path: Path, fields: _Fields, skipped: list[Skip]) -> Iterator[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # surrogateescape: a bad byte spoils its row only (found by _Fields), not the whole file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = list(reader.fieldnames or [])
        except csv.Error as exc:
            raise InputDataError(f"{path}: malformed CSV header ({exc})") from None
        fields.check_header(path, header)
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                skipped.append((f"{path}:{reader.line_num}", f"malformed CSV ({exc})"))
                continue
            where = f"{path}:{reader.line_num}"
            row = fields.row(where, record)
            if isinstance(row, str):
                skipped.append((where, row))
            else:
                yield row


def _line_rows(path: Path, skipped: list[Skip]) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines separate texts in a plain file; they are not rows
            where = f"{path}:{number}"
            line = _decode(raw.removeprefix(_BOM) if number == 1 else raw, where, skipped)
            text = " ".join(line.split()) if line is not None else ""
            if text:
                yield Row(where, None, (text,))


def _folder_rows(folder: Path, kind: RowKind, skipped: list[Skip]) -> Iterator[Row]:
    for image in walk_images(folder, skipped):
        caption_file = os.path.splitext(image)[0] + ".txt"
        if not os.path.isfile(caption_file):
            if kind == "image":
                yield Row(image, image, ())
            else:
                skipped.append((image, f"no caption file {os.path.basename(caption_file)}"))
            continue
        try:
            data = Path(caption_file).read_bytes()
        except OSError as exc:
            skipped.append((caption_file, f"unreadable ({exc.strerror})"))
            continue
        lines = [
            _decode(raw, f"{caption_file}:{number}", skipped)
            for number, raw in enumerate(data.removeprefix(_BOM).splitlines(), start=1)
        ]
        texts = tuple(" ".join(line.split()) for line in lines if line and line.strip())
        if not texts and kind != "image":
            skipped.append((image, f"empty caption file {os.path.basename(caption_file)}"))
            continue
        yield Row(image, None if kind == "text" else image, texts)


# WebDataset shards -------------------------------------------------------------------------


def expand_shards(source: str | Path) -> list[Path]:
    """A .tar file, a folder of .tar files, or a brace pattern ``name-{000..009}.tar``."""
    text = str(source)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", text)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        paths = [
            Path(text[: match.start()] + str(i).zfill(width) + text[match.end() :])
            for i in range(int(lo), int(hi) + 1)
        ]
    elif Path(text).is_dir():
        paths = sorted(Path(text).glob("*.tar"))
    else:
        paths = [Path(text)]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise InputDataError(
            f"{source}: shard {missing[0] if missing else '(none)'} does not exist"
        )
    return paths


def iter_shard_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members of a WebDataset shard by key (name up to the first dot)."""
    current: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                directory = member.name[: -len(name)]
                key, _, ext = name.partition(".")
                key = directory + key
                if current is not None and key != current:
                    yield current, files
                    files = {}
                current = key
                data = tar.extractfile(member)
                files[ext.lower()] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError) as exc:
        log_skipped([(str(path), f"unreadable shard, the rest of it skipped ({exc})")])
    if current is not None:
        yield current, files


def read_shard_sample(files: dict[str, bytes]) -> tuple[bytes, tuple[str, ...]] | str:
    """A shard sample's image bytes and captions (its .txt lines, else its .json's text
    column), or the reason it is unusable."""
    image_ext = next((e for e in files if "." + e in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        return "no image"
    try:
        if "txt" in files:
            return files[image_ext], _texts(
                files["txt"].decode("utf-8", "replace").splitlines(), ""
            )
        if "json" not in files:
            return "no caption (.txt or .json)"
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"invalid JSON in .json ({getattr(exc, 'msg', exc)})"
        fields = _Fields(Path("."), "text", None, None)
        return files[image_ext], fields._row("", meta).texts
    except _BadRow as exc:
        return str(exc)
