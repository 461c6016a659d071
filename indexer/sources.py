"""Finding the items to index: image files (folders, files, JSONL/CSV manifests) and texts.

Bad items are not errors here: each comes back as ``(where, reason)`` in ``skipped``, and the run
goes on. Only a source the caller named that does not exist at all raises InputDataError.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from beit3.errors import InputDataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "FileItem",
    "ImageScan",
    "TextItem",
    "TextScan",
    "hash_files",
    "read_texts",
    "scan_images",
    "sha256_text",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".jsonl", ".csv", ".tsv"})
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "filename")
TEXT_COLUMNS = ("text", "caption", "sentence", "title")
MAX_TEXT_CHARS = 10_000
_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileItem:
    """An image file: absolute path, size in bytes, mtime in seconds."""

    path: str
    size: int
    mtime: float


@dataclass
class ImageScan:
    """What a run covers: the files found, and the scope that a missing stored path is judged by
    (a stored path inside a scanned folder, or named by a file argument or manifest, that was not
    found again has been deleted)."""

    items: list[FileItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    files: set[str] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)  # path -> a manifest's text column

    def in_scope(self, path: str) -> bool:
        return path in self.files or any(path.startswith(f + os.sep) for f in self.folders)


def scan_images(sources: Sequence[str | Path] | str | Path) -> ImageScan:
    """Walk folders (recursively; hidden names skipped; image extensions in any case), take image
    files as given, and read JSONL/CSV manifests (a column named one of IMAGE_COLUMNS; relative
    paths are relative to the manifest)."""
    scan = ImageScan()
    found: dict[str, FileItem] = {}
    if isinstance(sources, str | Path):
        sources = [sources]
    for source in sources:
        path = os.path.abspath(source)
        if os.path.isdir(path):
            scan.folders.append(path.rstrip(os.sep))
            for file in _walk(path, scan.skipped):
                _add_file(file, found, scan.skipped)
        elif os.path.isfile(path) and Path(path).suffix.lower() in MANIFEST_EXTENSIONS:
            for file, label in _manifest_paths(Path(path), scan.skipped):
                scan.files.add(file)
                _add_file(file, found, scan.skipped)
                if label:
                    scan.labels.setdefault(file, label)
        elif os.path.lexists(path):
            scan.files.add(path)
            _add_file(path, found, scan.skipped)
        else:
            raise InputDataError(
                f"{source}: no such file or folder; pass image folders, image "
                "files or a JSONL/CSV manifest"
            )
    scan.items = sorted(found.values(), key=lambda item: item.path)
    return scan


def _walk(root: str, skipped: list[tuple[str, str]]) -> list[str]:
    files = []

    def onerror(exc: OSError) -> None:
        skipped.append((exc.filename or root, f"unreadable folder ({exc.strerror})"))

    for folder, dirs, names in os.walk(root, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(os.path.join(folder, name))
    return files


def _add_file(path: str, found: dict[str, FileItem], skipped: list[tuple[str, str]]) -> None:
    if path in found:
        return
    try:
        st = os.stat(path)
    except OSError as exc:
        skipped.append(
            (
                path,
                "no such file"
                if isinstance(exc, FileNotFoundError)
                else f"unreadable ({exc.strerror})",
            )
        )
        return
    if not os.path.isfile(path):
        skipped.append((path, "not a regular file"))
        return
    if st.st_size == 0:
        skipped.append((path, "empty file"))
        return
    found[path] = FileItem(path, st.st_size, st.st_mtime)


def _manifest_paths(manifest: Path, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(absolute image path, label) per record; the label is the record's text column (e.g. a
    caption) when it has one, else ""."""
    base = manifest.parent
    labels: dict[str, str] = {}
    with contextlib.suppress(InputDataError):  # a CSV without a text column: images only
        labels = dict(_manifest_values(manifest, TEXT_COLUMNS, None, []))
    out = []
    for where, value in _manifest_values(manifest, IMAGE_COLUMNS, None, skipped):
        if not value.strip():
            skipped.append((where, "empty image path"))
            continue
        out.append((os.path.abspath(base / value.strip()), " ".join(labels.get(where, "").split())))
    return out


def _manifest_values(
    path: Path,
    candidates: Sequence[str],
    column: str | None,
    skipped: list[tuple[str, str]],
) -> list[tuple[str, str]]:
    """(``file:line``, value of the column) for each record of a JSONL or CSV/TSV file."""
    suffix = path.suffix.lower()
    wanted = [column] if column else list(candidates)
    out: list[tuple[str, str]] = []
    raw = _read_bytes(path)
    if suffix == ".jsonl":
        chosen: str | None = None
        for number, line_bytes in enumerate(raw.splitlines(), start=1):
            where = f"{path}:{number}"
            line = _decode(line_bytes, where, skipped)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                skipped.append((where, f"invalid JSON ({exc.msg})"))
                continue
            if isinstance(record, str) and column is None:
                out.append((where, record))
                continue
            if not isinstance(record, dict):
                skipped.append((where, f"expected a JSON object, got {type(record).__name__}"))
                continue
            chosen = chosen or next((c for c in wanted if c in record), None)
            if chosen is None or chosen not in record:
                skipped.append(
                    (
                        where,
                        f"no field {' / '.join(wanted)}" + ("" if column else "; pass --column"),
                    )
                )
                continue
            value = record[chosen]
            if not isinstance(value, str):
                skipped.append((where, f"field {chosen!r} is {type(value).__name__}, not a string"))
                continue
            out.append((where, value))
        return out
    text = raw.decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(
        io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","
    )
    header = reader.fieldnames or []
    chosen = next((c for c in wanted if c in header), None)
    if chosen is None:
        raise InputDataError(
            f"{path}: no column {' / '.join(wanted)}; its columns are {', '.join(header) or 'none'}"
            "; pass --column NAME"
        )
    for number, record in enumerate(reader, start=2):
        where = f"{path}:{number}"
        value = record.get(chosen)
        if value is None:
            skipped.append((where, f"row has no value for column {chosen!r}"))
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            skipped.append((where, "invalid UTF-8"))
            continue
        out.append((where, value))
    return out


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputDataError(f"{path}: cannot read ({exc.strerror})") from None


def _decode(data: bytes, where: str, skipped: list[tuple[str, str]]) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        skipped.append(
            (where, f"invalid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start + 1})")
        )
        return None


def hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: Sequence[str], threads: int = 4) -> list[str | tuple[str, str]]:
    """sha256 of each file (hashlib releases the GIL, so threads overlap I/O and hashing).

    Returns, per path, the hex digest or ``("error", reason)``.
    """

    def one(path: str) -> str | tuple[str, str]:
        try:
            return hash_file(path)
        except OSError as exc:
            return (
                "error",
                "no such file"
                if isinstance(exc, FileNotFoundError)
                else f"unreadable ({exc.strerror})",
            )

    if len(paths) < 8:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, paths, chunksize=64))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TextItem:
    """A text and where it came from (``file:line``)."""

    ref: str
    text: str


@dataclass
class TextScan:
    items: list[TextItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    file: str = ""
    mtime: float = 0.0

    def in_scope(self, ref: str) -> bool:
        return ref.rpartition(":")[0] == self.file


def read_texts(
    source: str | Path, column: str | None = None, max_chars: int = MAX_TEXT_CHARS
) -> TextScan:
    """Texts of a plain file (one per line), a JSONL file (a field) or a CSV/TSV file (a column).

    Empty texts (of JSONL/CSV records), texts over ``max_chars`` and lines that are not UTF-8 are
    skipped with a reason; blank lines of a plain file are separators, not items. Surrounding
    whitespace is stripped.
    """
    path = Path(os.path.abspath(source))
    if not path.is_file():
        raise InputDataError(
            f"{source}: no such file; pass a text file (one text per line), a JSONL or a CSV file"
        )
    suffix = path.suffix.lower()
    scan = TextScan(file=str(path), mtime=path.stat().st_mtime)
    if suffix in MANIFEST_EXTENSIONS:
        records = _manifest_values(path, TEXT_COLUMNS, column, scan.skipped)
    else:
        if column is not None:
            raise InputDataError(
                f"{source}: --column applies to JSONL/CSV/TSV files; this is "
                "read as plain text, one text per line"
            )
        records = []
        for number, line_bytes in enumerate(_read_bytes(path).splitlines(), start=1):
            where = f"{path}:{number}"
            if not line_bytes.strip():
                continue  # blank lines separate texts in a plain file; they are not items
            line = _decode(line_bytes, where, scan.skipped)
            if line is not None:
                records.append((where, line))
    for where, value in records:
        text = value.strip()
        if not text:
            scan.skipped.append((where, "empty text"))
        elif len(text) > max_chars:
            scan.skipped.append(
                (where, f"text too long ({len(text):,} characters > {max_chars:,}); split it")
            )
        else:
            scan.items.append(TextItem(where, text))
    return scan
