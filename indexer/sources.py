"""Finding the items to index: image files (folders, files, manifests) and texts, with hashes.

Manifests, folders and text files are read by :mod:`beit3.data`, the reader that training,
evaluation and pretraining use too (same columns, same rows, same skip reasons). Bad items are not
errors here: each comes back as ``(where, reason)`` in ``skipped``, and the run goes on. Only a
source the caller named that does not exist at all raises InputDataError.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from beit3.data import MANIFEST_EXTENSIONS, read_rows, walk_images
from beit3.errors import InputDataError

__all__ = [
    "FileItem",
    "ImageScan",
    "TextItem",
    "TextScan",
    "hash_files",
    "scan_images",
    "scan_texts",
    "sha256_text",
]

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
    files as given, and read manifests (``beit3.data.read_rows``: JSONL, JSON, CSV or TSV with a
    column named one of ``beit3.data.IMAGE_COLUMNS``; relative paths are relative to the
    manifest; the row's caption, if any, labels the image)."""
    scan = ImageScan()
    found: dict[str, FileItem] = {}
    if isinstance(sources, str | Path):
        sources = [sources]
    for source in sources:
        path = os.path.abspath(source)
        if os.path.isdir(path):
            scan.folders.append(path.rstrip(os.sep))
            for file in walk_images(path, scan.skipped):
                _add_file(file, found, scan.skipped)
        elif os.path.isfile(path) and Path(path).suffix.lower() in MANIFEST_EXTENSIONS:
            for row in read_rows(path, "image", skipped=scan.skipped):
                assert row.image is not None, "an image row has an image"
                scan.files.add(row.image)
                _add_file(row.image, found, scan.skipped)
                if row.texts:
                    scan.labels.setdefault(row.image, row.texts[0])
        elif os.path.lexists(path):
            scan.files.add(path)
            _add_file(path, found, scan.skipped)
        else:
            raise InputDataError(
                f"{source}: no such file or folder; pass image folders, image "
                "files or a JSONL/JSON/CSV/TSV manifest"
            )
    scan.items = sorted(found.values(), key=lambda item: item.path)
    return scan


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


def scan_texts(
    source: str | Path, column: str | None = None, max_chars: int = MAX_TEXT_CHARS
) -> TextScan:
    """Texts of a plain file (one per line), or of a JSONL / JSON / CSV / TSV file's text column.

    Read by ``beit3.data.read_rows``: bad rows (invalid JSON or UTF-8, an empty or non-string
    text) are skipped with a reason, blank lines of a plain file are separators, not items, and
    whitespace runs become one space. Texts over ``max_chars`` are skipped too. A text is
    referred to as ``file:line``; the captions of a list value as ``file:line#1``, ``#2``...
    """
    path = Path(os.path.abspath(source))
    if not path.is_file():
        raise InputDataError(
            f"{source}: no such file; pass a text file (one text per line), a JSONL, JSON or CSV "
            "file"
        )
    scan = TextScan(file=str(path), mtime=path.stat().st_mtime)
    for row in read_rows(path, "text", text_column=column, skipped=scan.skipped):
        for number, text in enumerate(row.texts, start=1):
            ref = row.where if len(row.texts) == 1 else f"{row.where}#{number}"
            if len(text) > max_chars:
                scan.skipped.append(
                    (ref, f"text too long ({len(text):,} characters > {max_chars:,}); split it")
                )
            else:
                scan.items.append(TextItem(ref, text))
    return scan
