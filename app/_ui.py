"""Helpers of the Streamlit app that need no Streamlit: arguments, uploads, thumbnails, names.

Kept apart from ``streamlit_app.py`` so the rules (what an upload may be, which files may be shown)
read in one place and can be tested without a page.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

# beit3 (and so torch) is imported inside the functions: `beit3 app --help` must stay instant.

# Defaults shared by `beit3 app` and the page (the page states the limits it enforces).
DEFAULT_MAX_UPLOAD_MB = 20
MAX_UPLOAD_PIXELS = 40_000_000  # 40 MP: a large phone photo is 12-50 MP; more is not worth decoding
UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
THUMB_SIZE = 256
THUMB_BACKGROUND = (244, 244, 240)
DEFAULT_RERANK = 32  # candidates the fusion encoder re-scores per query
DEFAULT_MIN_MATCH = 0.5  # calibrated: a hit at the cutoff matches as often as not


@dataclass(frozen=True)
class AppArgs:
    """What `beit3 app` passes to the page after ``--``."""

    dbs: tuple[Path, ...] = ()
    model: Path | None = None
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    errors: tuple[str, ...] = field(default=())


def parse_app_args(argv: Sequence[str]) -> AppArgs:
    """Parse the page's own arguments (``--db DIR`` repeated, ``--model``, ``--max-upload-mb``).

    Never exits: a bad argument becomes a message the page shows.
    """
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--db", action="append", default=[])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB)
    try:
        ns, unknown = parser.parse_known_args(list(argv))
    except (argparse.ArgumentError, ValueError) as exc:
        return AppArgs(errors=(f"bad app arguments: {exc}",))
    errors = tuple(f"unknown app argument {arg!r}" for arg in unknown)
    return AppArgs(
        dbs=tuple(Path(db).expanduser() for db in ns.db),
        model=Path(ns.model).expanduser() if ns.model else None,
        max_upload_mb=max(1, ns.max_upload_mb),
        errors=errors,
    )


def db_labels(dbs: Sequence[Path]) -> dict[str, Path]:
    """Short unique labels for the database picker: the folder name, made unique with its parent."""
    labels: dict[str, Path] = {}
    for db in dbs:
        label = db.name or str(db)
        if label in labels:
            label = str(db)
        labels[label] = db
    return labels


def describe_db_problem(db: Path) -> str | None:
    """Why ``db`` cannot be a database, as a message for the page; None when it may be one."""
    if not db.exists():
        return (
            f"There is no database at `{db}`. Build one with "
            f"`beit3 index images PHOTOS/ --db {db}`, then restart the app."
        )
    if not db.is_dir():
        return f"`{db}` is a file, not a database folder. Pass the folder `beit3 index` wrote."
    if not any(db.iterdir()):
        return (
            f"The database `{db}` is empty. Add images with "
            f"`beit3 index images PHOTOS/ --db {db}`, then restart the app."
        )
    return None


def decode_upload(
    data: bytes,
    name: str,
    *,
    max_mb: int,
    max_pixels: int = MAX_UPLOAD_PIXELS,
) -> Image.Image:
    """Turn uploaded bytes into an RGB image, or say in one sentence why not.

    Checks the byte size and the pixel count (read from the header, before decoding) so a huge
    image is refused without being decoded.

    Raises:
        InputDataError: the file is too big, not an image, or has too many pixels.
    """
    from beit3 import InputDataError, load_image

    if len(data) > max_mb * 1024 * 1024:
        raise InputDataError(
            f"{name} is {len(data) / 2**20:.1f} MB; the upload limit is "
            f"{max_mb} MB. Resize or compress it and try again."
        )
    if not data:
        raise InputDataError(f"{name} is an empty file, not an image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))  # lazy: reads the size, decodes nothing
            width, height = header.size
    except Image.DecompressionBombError:
        raise InputDataError(
            f"{name} has too many pixels to be opened safely. Resize it and try again."
        ) from None
    except Exception:  # noqa: BLE001 - any failure to read a header means "not an image"
        raise InputDataError(
            f"{name} is not an image we can read (PNG, JPEG, WebP, GIF, BMP "
            "or TIFF). Pick an image file and try again."
        ) from None
    if width * height > max_pixels:
        raise InputDataError(
            f"{name} is {width}\u00d7{height} pixels ({width * height / 1e6:.0f} MP); the limit is "
            f"{max_pixels / 1e6:.0f} MP. Resize it and try again."
        )
    try:
        return load_image(data)
    except InputDataError:
        raise InputDataError(
            f"{name} looks like an image but cannot be decoded (corrupt or "
            "truncated). Try another file."
        ) from None


def content_key(data: bytes) -> str:
    """A short stable key for uploaded bytes."""
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()[:16]


def thumbnail(path: str | Path, size: int = THUMB_SIZE) -> Image.Image | None:
    """A square thumbnail of an indexed image, padded (not cropped); None if it cannot be read.

    The page shows these re-encoded thumbnails and never hands a file path to the browser.
    """
    from beit3 import InputDataError, load_image

    try:
        image = load_image(Path(path), draft_size=size)
    except InputDataError:
        return None
    return ImageOps.pad(
        image, (size, size), method=Image.Resampling.BICUBIC, color=THUMB_BACKGROUND
    )


def hit_name(path: str | None, item_id: Any, label: str | None = None) -> str:
    """The name shown under a thumbnail: the image's label from a manifest when it has one,
    else its file name (the id when the hit has no path)."""
    if label:
        return label
    return Path(path).name if path else str(item_id)


def format_score(score: float) -> str:
    return f"{score:.3f}"


def format_match(probability: float) -> str:
    """A calibrated match probability as a percentage: ``0.87`` -> ``87%``; one decimal near 0
    and 1, where a rounded ``0%`` or ``100%`` would claim certainty."""
    if probability < 0.001:
        return "<0.1%"
    if probability > 0.999:
        return ">99.9%"
    if probability < 0.01 or probability > 0.99:
        return f"{probability:.1%}"
    return f"{probability:.0%}"


def hit_caption(hit: Any) -> str:
    """The line under an image card: ``score 0.312 · #1``, or ``score 0.312 · match 87% · #1``
    when the hit was reranked."""
    parts = [f"score {format_score(hit.score)}"]
    if hit.match is not None:
        parts.append(f"match {format_match(hit.match)}")
    parts.append(f"#{hit.rank}")
    if getattr(hit, "similar", 0):
        parts.append(f"+{hit.similar} similar")
    return " \u00b7 ".join(parts)


@dataclass(frozen=True)
class Rerank:
    """The page's reranking settings: the fusion encoder re-scores the vector search's top
    ``candidates``; with ``min_match`` set, hits below that probability are hidden."""

    candidates: int = DEFAULT_RERANK
    min_match: float | None = DEFAULT_MIN_MATCH


def reranks(query_kind: str, modality: str) -> bool:
    """Whether the matcher scores this search: it needs an image-text pair whose query the page
    holds, i.e. a typed text against an image table or an uploaded image against a text table.
    A clicked item is searched with its stored vector, so it stays in cosine order."""
    return (query_kind, modality) in (("text", "image"), ("upload", "text"))


def cosine_only_note(query_kind: str, modality: str) -> str:
    """Why a section is in cosine order although reranking is on."""
    if query_kind == "item":
        return "Cosine order: reranking applies to a typed query or an uploaded image."
    return "Cosine order: the fusion encoder scores image\u2013text pairs only."


@dataclass(frozen=True)
class Reranked:
    """What a reranked section shows.

    hits: the hits on screen; more: whether another page exists; confident: False when no
    candidate reaches the cutoff, and ``hits`` are then the nearest ones by match, not results;
    hidden: candidates below the cutoff left out; candidates: how many the matcher scored.
    """

    hits: list[Any]
    more: bool
    confident: bool
    hidden: int
    candidates: int


def arrange_reranked(ranked: Sequence[Any], min_match: float | None, shown: int) -> Reranked:
    """Cut the reranked list (``Searcher.search(..., k=K, rerank=K)``, ordered by match) for the
    page: the first ``shown`` hits at or above ``min_match``, ranked 1.. in that filtered list
    exactly as ``Searcher.search(..., min_match=min_match)`` ranks them. When none passes, the
    first ``shown`` candidates with their own ranks, marked not confident."""
    passed = [h for h in ranked if min_match is None or h.match >= min_match]
    hidden = len(ranked) - len(passed)
    confident = bool(passed) or not ranked
    if confident:
        pool = [dataclasses.replace(h, rank=i + 1) for i, h in enumerate(passed)]
    else:
        pool = list(ranked)
    return Reranked(pool[:shown], len(pool) > shown, confident, hidden, len(ranked))


def no_confident_match(query: str, candidates: int, min_match: float) -> str:
    """The message when the cutoff removes every candidate (``query`` is shown as typed)."""
    return (
        f"No confident match for \u201c{md_escape(query)}\u201d (none of the top {candidates} "
        f"reaches {min_match:.0%})."
    )


_MD_SPECIAL = "\\`*_{}[]<>()#+-.!|~$:"


def md_escape(text: str) -> str:
    """Escape Markdown so indexed texts, file names and queries render as plain text.

    Also stops a query like ``![](http://elsewhere)`` from making the browser fetch anything,
    and ``:`` from starting one of Streamlit's directives (``2:red heart`` lost ``:red`` to its
    colour syntax; ``:heart:`` in a caption became an emoji).
    """
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in text)


_WORDS = re.compile(r"[A-Za-z]+")


def examples_from_texts(
    texts: Iterable[str | None], limit: int = 3, max_chars: int = 40
) -> list[str]:
    """Example queries taken from indexed texts: short, distinct, in the order given."""
    out: list[str] = []
    for text in texts:
        text = " ".join((text or "").split())
        if 2 < len(text) <= max_chars and text.lower() not in (o.lower() for o in out):
            out.append(text)
        if len(out) == limit:
            break
    return out


def examples_from_names(paths: Iterable[str | None], limit: int = 3) -> list[str]:
    """Example queries made from file names: ``red_circle_0.png`` -> ``red circle``."""
    out: list[str] = []
    for path in paths:
        if not path:
            continue
        words = [
            w.lower()
            for w in _WORDS.findall(Path(path).stem)
            if len(w) > 1 and w.lower() not in ("img", "image", "dsc", "photo", "jpg", "png")
        ]
        phrase = " ".join(words[:4])
        if phrase and phrase not in out:
            out.append(phrase)
        if len(out) == limit:
            break
    return out


# --- steering: compositional terms, feedback, mode, filters, collapse --------------------------

MODES = ("vector", "keyword", "hybrid")
# cosine; on the demo index 0.97 folds skin-tone variants into their emoji with 78% of the folds
# right, 0.95 with 66% (bench/steer_quality.py); re-encoded or resized copies of a photo sit higher
DEFAULT_COLLAPSE = 0.97
EXPORT_LIMIT = 200  # hits the download buttons export (every page up to this many)


@dataclass(frozen=True)
class Chip:
    """One term added to the query in the page (shown as a chip): ``kind`` is "text" (``text``),
    "item" (an indexed hit: ``table``, ``item_id``) or "image" (an upload: ``image``, the decoded
    picture, and ``item_id``, its content key); ``negative`` subtracts it."""

    kind: str
    label: str
    text: str = ""
    table: str = ""
    item_id: Any = None
    negative: bool = False
    image: Any = field(default=None, compare=False)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.text, self.table, self.item_id, self.negative)

    def term(self) -> Any:
        from indexer import Term

        weight = -1.0 if self.negative else 1.0
        if self.kind == "item":
            return Term.item(str(self.item_id), weight, table=self.table or None)
        if self.kind == "image":
            return Term.image(self.image, weight)
        return Term.text(self.text, weight)


@dataclass(frozen=True)
class Steering:
    """How the page steers a search beyond a plain query; the defaults leave it plain.

    filters apply to image tables only (the columns they read are image facts); feedback ids
    (``liked`` / ``disliked``) may come from either table: the vectors share one space.
    """

    mode: str = "vector"
    filters: Any = None  # indexer.Filters or None
    collapse: float | None = None
    chips: tuple[Chip, ...] = ()
    liked: tuple[str, ...] = ()
    disliked: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.mode,
            self.filters,
            self.collapse,
            tuple(c.key for c in self.chips),
            self.liked,
            self.disliked,
        )

    def is_plain(self, text: str = "") -> bool:
        """No steering at all: the page's plain (and rerankable) search applies."""
        from indexer.query import is_compositional

        return (
            self.mode == "vector"
            and (self.filters is None or self.filters == type(self.filters)())
            and self.collapse is None
            and not self.chips
            and not self.liked
            and not self.disliked
            and not is_compositional(text)
        )


def composite_query(
    kind: str, text: str, image: Any, table: str, item_id: Any, chips: Sequence[Chip]
) -> Any:
    """The page's query as an :class:`indexer.CompositeQuery`: the active query (a typed text,
    parsed when it uses the query syntax but never reading a path; an upload; a clicked item)
    followed by the chips.

    Raises:
        InputDataError: bad syntax in the typed text.
    """
    from indexer import CompositeQuery, Term, parse_query
    from indexer.query import is_compositional

    terms: list[Any] = []
    if kind == "text":
        if is_compositional(text):
            terms.extend(parse_query(text, allow_paths=False).terms)
        else:
            terms.append(Term.text(text))
    elif kind == "upload":
        terms.append(Term.image(image))
    elif kind == "item":
        terms.append(Term.item(str(item_id), table=table))
    terms.extend(chip.term() for chip in chips)
    return CompositeQuery(tuple(terms))


def make_filters(
    under: str = "",
    types: Sequence[str] = (),
    modified_after: Any = None,
    modified_before: Any = None,
    camera: str = "",
    min_width: int = 0,
    min_height: int = 0,
) -> Any:
    """The sidebar's filter inputs as :class:`indexer.Filters`, or None when none is set
    (dates: ``datetime.date``; sizes: 0 = no bound)."""
    from indexer import Filters

    filters = Filters(
        under=tuple(p.strip() for p in under.split(",") if p.strip()),
        types=tuple(types),
        modified_after=modified_after.isoformat() if modified_after else None,
        modified_before=modified_before.isoformat() if modified_before else None,
        camera=camera.strip() or None,
        min_width=int(min_width) or None,
        min_height=int(min_height) or None,
    )
    return None if filters == Filters() else filters
