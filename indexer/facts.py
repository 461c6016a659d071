"""Searchable facts of a row, stored beside its vector: words for keyword search, and the file
type, image size and EXIF date / camera that filters use.

Image facts come from the file's header (``PIL.Image.open`` reads no pixels), so storing them
costs a fraction of the decode the embedder does anyway.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

__all__ = [
    "FACT_COLUMNS",
    "image_facts",
    "keyword_query",
    "path_words",
    "row_facts",
    "search_text",
]

# Columns added for keyword search and filters (the stores' ROW_COLUMNS end with these).
FACT_COLUMNS = ("search_text", "ext", "width", "height", "taken", "camera")

_EXIF_IFD = 0x8769
_DATE_TIME_ORIGINAL = 0x9003
_DATE_TIME = 0x0132
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112
# camelCase and letters/digits boundaries: "holidayRome" -> "holiday Rome", "IMG2041" -> "IMG
# 2041" (three or more of each side, so hex codes such as "fe0f" and "1f355" stay whole).
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_LETTERS_THEN_DIGITS = re.compile(r"(?<=[A-Za-z]{3})(?=[0-9]{3})|(?<=[0-9]{3})(?=[A-Za-z]{3})")
_NON_WORD = re.compile(r"[^0-9A-Za-z\u00c0-\uffff]+")


def path_words(path: str, folders: int = 2) -> list[str]:
    """The lower-case words of a file name and its ``folders`` nearest folders, extension dropped.

    ``.../2024/Holiday Rome/IMG_2041.jpg`` -> ``['2024', 'holiday', 'rome', 'img', '2041']``;
    ``holidayRome/DSC0042.JPG`` -> ``['holidayrome', 'holiday', 'rome', 'dsc0042', 'dsc',
    '0042']`` (a word that splits is kept whole too, and so is a name of several words, without
    its separators: ``23-fe0f-20e3.png`` -> ``['23fe0f20e3', '23', 'fe0f', '20e3']``; see
    :func:`keyword_query`).
    """
    parts = [p for p in re.split(r"[\\/]", path) if p]
    if not parts:
        return []
    parts[-1] = os.path.splitext(parts[-1])[0]
    words = []
    for part in parts[-(folders + 1) :]:
        chunks = [c for c in _NON_WORD.split(part) if c]
        if len(chunks) > 1:  # the name as one word too: a typed "IMG_2041" finds it first
            words.append("".join(chunks).lower())
        for chunk in chunks:
            if not chunk:
                continue
            parts_of = _LETTERS_THEN_DIGITS.sub(" ", _CAMEL.sub(" ", chunk)).split()
            if len(parts_of) > 1:
                words.append(chunk.lower())
            words.extend(w.lower() for w in parts_of)
    return words


def keyword_query(text: str) -> str:
    """The words sent to the full-text index for ``text``: the text, plus each of its words that
    joins parts with ``-``, ``_`` or ``.`` once more without them (as :func:`path_words`
    stores a file name), so ``IMG_2041`` or ``1f9d1-1f3fd`` ranks that exact file first."""
    joined = []
    for word in text.split():
        chunks = [c for c in _NON_WORD.split(word) if c]
        if len(chunks) > 1:
            joined.append("".join(chunks).lower())
    return " ".join([text, *joined])


def search_text(paths: Sequence[str], label: str | None) -> str:
    """An image row's keyword field: its label (a manifest caption), then the words of every
    path with this content, each word once."""
    seen: dict[str, None] = {}
    for path in paths:
        for word in path_words(path):
            seen.setdefault(word, None)
    words = " ".join(seen)
    return f"{label} {words}".strip() if label else words


def _exif_time(value: Any) -> float | None:
    """EXIF ``YYYY:MM:DD HH:MM:SS`` (camera local time, read as UTC) -> epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.strptime(value.strip()[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    return parsed.replace(tzinfo=datetime.timezone.utc).timestamp()


def image_facts(path: str) -> dict[str, Any]:
    """Width and height (as displayed, after EXIF rotation), date taken (epoch seconds) and
    camera ("Make Model") of an image file; None for what the file does not say or cannot be
    read."""
    facts: dict[str, Any] = {"width": None, "height": None, "taken": None, "camera": None}
    try:
        with Image.open(path) as img:
            width, height = img.size
            exif = img.getexif()
    except Exception:  # noqa: BLE001 - an unreadable file has no facts; the embedder reports it
        return facts
    if exif.get(_ORIENTATION) in (5, 6, 7, 8):
        width, height = height, width
    facts["width"], facts["height"] = int(width), int(height)
    taken = _exif_time(exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL))
    facts["taken"] = taken if taken is not None else _exif_time(exif.get(_DATE_TIME))
    make, model = (str(exif.get(t) or "").strip("\x00 ") for t in (_MAKE, _MODEL))
    if model.lower().startswith(make.lower()):  # "Canon" + "Canon EOS R5" -> "Canon EOS R5"
        make = ""
    facts["camera"] = f"{make} {model}".strip() or None
    return facts


def row_facts(row: dict[str, Any], read_image: bool = True) -> dict[str, Any]:
    """The FACT_COLUMNS of a row (keys of META_COLUMNS' older part); image facts are read from
    the first of its paths that can be read when ``read_image``."""
    if row["modality"] == "text":
        return {
            "search_text": row.get("text") or "",
            "ext": None,
            "width": None,
            "height": None,
            "taken": None,
            "camera": None,
        }
    paths = list(row.get("paths") or [])
    path = row.get("path") or (paths[0] if paths else "")
    facts: dict[str, Any] = {"width": None, "height": None, "taken": None, "camera": None}
    if read_image:
        for candidate in [path, *paths]:
            facts = image_facts(candidate)
            if facts["width"] is not None:
                break
    ext = os.path.splitext(path)[1].lower().lstrip(".") or None
    return {"search_text": search_text(paths or [path], row.get("text")), "ext": ext, **facts}
