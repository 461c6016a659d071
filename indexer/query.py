"""Queries people can steer: weighted sums of texts and images, feedback, near-duplicate collapse.

A compositional query is a list of weighted terms; its vector is the normalised weighted sum of
the terms' unit embeddings::

    q = sum_i w_i * e_i / |e_i|,   vector = q / |q|

Query syntax (:func:`parse_query`, the CLI's ``beit3 search`` and the app's text box)::

    cat + ./hat.jpg - fruit        text "cat", plus the image ./hat.jpg, minus text "fruit"
    2:golden retriever + beach     weight 2 on "golden retriever", 1 on "beach"
    0.5:./a.png                    one image at weight 0.5
    "salt + pepper" + @<sha256>    quoted text is literal; @ID is a stored item of the table

Rules:
- Terms are split only by a ``+`` or ``-`` that stands alone between spaces (or starts the query):
  ``red-green`` and ``c++`` stay text. A ``-`` term enters with weight -1 times its own weight.
- ``W:`` before a term's first word is its weight, when W is a number and the character after
  the colon is not a digit (``10:30 meeting`` stays text). Weight 0 is an error.
- A term is an image when it is one unquoted word that starts with ``./``, ``../``, ``/`` or
  ``~``, or ends with an image suffix (.jpg .jpeg .png .gif .webp .bmp .tif .tiff); the file
  must exist. Everything else is text. Quote a term (``"..."``) to keep it text.
- ``@`` followed by a 64-hex item id is that item's stored vector (looked up in the searched
  table, then the others).
Errors are one line that quotes the token and its 1-based character position.

Feedback (:func:`rocchio`) moves a query towards hits marked relevant and away from those marked
not relevant; collapse (:func:`collapse_hits`) folds near-duplicate hits into the best of them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from beit3.errors import InputDataError

if TYPE_CHECKING:
    from indexer.filters import Filters
    from indexer.manifest import Version
    from indexer.search import Hit, Searcher

__all__ = [
    "COLLAPSE_WINDOW",
    "IMAGE_SUFFIXES",
    "ROCCHIO_DEFAULTS",
    "CompositeQuery",
    "Term",
    "collapse_hits",
    "is_compositional",
    "parse_query",
    "rocchio",
    "run_query",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
# Rocchio's classic weights (Salton & Buckley 1990 used 1 / 0.75 / 0.25 for positive-heavy
# feedback): the query stays dominant, relevant hits pull harder than non-relevant ones push.
ROCCHIO_DEFAULTS = (1.0, 0.75, 0.25)
COLLAPSE_WINDOW = 4  # with collapse, fetch at least this many raw hits per shown hit
_MAX_RAW = 10_000  # with collapse, never fetch more raw hits than this for one page
_WEIGHT = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(?!\d)")
_ITEM = re.compile(r"@([0-9a-f]{64})")
_OPERATOR = re.compile(r"(?:^|\s)[+-](?=\s|$)")


@dataclass(frozen=True)
class Term:
    """One weighted part of a query.

    kind: ``text`` (value: str), ``image`` (value: Path, bytes or PIL image) or ``item``
    (value: a stored item's sha256 id; table: where it is, None = the searched table first).
    """

    kind: str
    value: Any
    weight: float = 1.0
    table: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("text", "image", "item"):
            raise InputDataError(f"query term kind {self.kind!r}: use text, image or item")
        if not np.isfinite(self.weight) or self.weight == 0:
            raise InputDataError(f"query term weight {self.weight}: use a finite non-zero number")

    @classmethod
    def text(cls, text: str, weight: float = 1.0) -> Term:
        return cls("text", text, weight)

    @classmethod
    def image(cls, image: Any, weight: float = 1.0) -> Term:
        """``image``: a Path, bytes or a PIL image."""
        return cls("image", image, weight)

    @classmethod
    def item(cls, item_id: str, weight: float = 1.0, table: str | None = None) -> Term:
        return cls("item", item_id, weight, table)

    def label(self) -> str:
        """How the term reads in the query syntax (images other than paths: ``<image>``)."""
        if self.kind == "text":
            body = f'"{self.value}"' if _needs_quotes(self.value) else str(self.value)
        elif self.kind == "item":
            body = f"@{self.value}"
        elif isinstance(self.value, Path):
            body = str(self.value)
        else:
            body = "<image>"
        weight = abs(self.weight)
        return body if weight == 1 else f"{weight:g}:{body}"


@dataclass(frozen=True)
class CompositeQuery:
    """A weighted sum of terms (see the module docstring)."""

    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise InputDataError("the query has no terms; type a few words or add an image")

    @classmethod
    def of(cls, *terms: Term | str | Path) -> CompositeQuery:
        """Terms, with a ``str`` as a text term and a ``Path`` as an image term (weight 1)."""
        made = []
        for term in terms:
            if isinstance(term, str):
                term = Term.text(term)
            elif isinstance(term, Path):
                term = Term.image(term)
            made.append(term)
        return cls(tuple(made))

    def __add__(self, other: CompositeQuery) -> CompositeQuery:
        return CompositeQuery(self.terms + other.terms)

    def __str__(self) -> str:
        out = ""
        for i, term in enumerate(self.terms):
            sign = "-" if term.weight < 0 else "+"
            out += (f"{sign} " if sign == "-" else "") if i == 0 else f" {sign} "
            out += term.label()
        return out

    @property
    def keyword_text(self) -> str | None:
        """The words of the positive text terms (what keyword / hybrid mode matches), or None."""
        words = [t.value for t in self.terms if t.kind == "text" and t.weight > 0]
        return " ".join(words) if words else None

    def term_vectors(
        self, searcher: Searcher, table: str | None = None, version: Version | None = None
    ) -> np.ndarray:
        """(T, D) float32: each term's unit embedding (items: their stored vector, normalised),
        by the model of ``version`` (default: ``table``'s active version)."""
        rows = []
        for term in self.terms:
            if term.kind == "item":
                vector = _item_vector(searcher, term.value, term.table or table)
            else:
                vector = searcher.embed_query(term.value, table, version)
            rows.append(_unit(np.asarray(vector, dtype=np.float32), str(term.label())))
        return np.stack(rows)

    def embed(
        self, searcher: Searcher, table: str | None = None, version: Version | None = None
    ) -> np.ndarray:
        """(D,) float32 unit vector: the normalised weighted sum of the unit term embeddings
        (``version``: as for :meth:`term_vectors`).

        Raises:
            InputDataError: a term cannot be embedded, or the terms cancel out.
        """
        weights = np.asarray([t.weight for t in self.terms], dtype=np.float32)
        total = weights @ self.term_vectors(searcher, table, version)  # (T,) @ (T, D) -> (D,)
        return _unit(total, str(self))


def _unit(vector: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InputDataError(
            f"query {what!r}: the terms cancel out (their weighted sum is the zero vector); "
            "change a weight or drop a term"
        )
    return (vector / norm).astype(np.float32)


def _item_vectors(searcher: Searcher, item_ids: Sequence[str], table: str) -> np.ndarray:
    """(N, D) stored vectors of feedback ids: one read when all are in ``table`` (the usual
    case: hits of the page marked), else id by id across the tables."""
    try:
        return searcher.get_vectors(table, list(item_ids))
    except InputDataError:
        return np.stack([_item_vector(searcher, i, table) for i in item_ids])


def _item_vector(searcher: Searcher, item_id: str, table: str | None) -> np.ndarray:
    names = list(searcher.manifest.searchable())
    order = ([table] if table in names else []) + [n for n in names if n != table]
    for name in order:
        vector = searcher.get_vector(name, item_id)
        if vector is not None:
            return vector
    raise InputDataError(
        f"query term @{item_id}: no item with this id in {searcher.db} "
        f"(tables: {', '.join(names) or 'none'})"
    )


# -- the syntax ------------------------------------------------------------------------------------


def is_compositional(text: str) -> bool:
    """True when ``text`` uses the query syntax: a lone ``+`` / ``-`` or a ``W:`` weight.

    The CLI parses only such queries, so a plain query means what it always meant.
    """
    if _OPERATOR.search(text):
        return True
    return any(_WEIGHT.match(word) for word in text.split())


def parse_query(text: str, base: Path | None = None, allow_paths: bool = True) -> CompositeQuery:
    """Parse the query syntax of the module docstring; image paths are relative to ``base``
    (default: the working directory). ``allow_paths=False`` (a web page, where a path would
    read the server's disk) makes an image term an error.

    Raises:
        InputDataError: bad syntax or a missing image file, naming the token and its position.
    """
    base = base or Path.cwd()
    words = _words(text)
    if not words:
        raise InputDataError("the query is empty; type a few words, e.g. 'cat + ./hat.jpg'")
    terms: list[Term] = []
    sign = 1.0
    group: list[tuple[int, str, bool]] = []
    operator: tuple[int, str] | None = None  # the last + / - and its position
    for pos, word, quoted in words:
        if quoted or word not in ("+", "-"):
            group.append((pos, word, quoted))
            continue
        if group:
            terms.append(_term(text, group, sign, base, allow_paths))
            group = []
        elif operator is not None:
            _missing_term(text, operator)
        sign = -1.0 if word == "-" else 1.0
        operator = (pos, word)
    if group:
        terms.append(_term(text, group, sign, base, allow_paths))
    elif operator is not None:
        _missing_term(text, operator)
    return CompositeQuery(tuple(terms))


def _missing_term(text: str, operator: tuple[int, str]) -> None:
    raise InputDataError(
        f"query {text!r}: expected a term after {operator[1]!r} at character {operator[0]}; "
        "write e.g. 'cat + hat'"
    )


def _words(text: str) -> list[tuple[int, str, bool]]:
    """Whitespace-separated words with their 1-based start; ``"..."`` is one quoted word."""
    words = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        start = i
        if text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise InputDataError(
                    f"query {text!r}: the quote at character {start + 1} is not closed; "
                    'end it with another "'
                )
            words.append((start + 1, text[i + 1 : end], True))
            i = end + 1
            continue
        while i < len(text) and not text[i].isspace():
            i += 1
        words.append((start + 1, text[start:i], False))
    return words


def _term(
    text: str, group: list[tuple[int, str, bool]], sign: float, base: Path, allow_paths: bool
) -> Term:
    pos, first, quoted = group[0]
    weight = 1.0
    match = None if quoted else _WEIGHT.match(first)
    if match is not None:
        weight = float(match.group(1))
        if weight == 0:
            raise InputDataError(
                f"query {text!r}: weight {match.group(0)!r} at character {pos} is 0; "
                "drop the term or give it a non-zero weight"
            )
        rest = first[match.end() :]
        group = ([(pos + match.end(), rest, False)] if rest else []) + group[1:]
        if not group:
            raise InputDataError(
                f"query {text!r}: weight {match.group(0)!r} at character {pos} has no term "
                "after it; write e.g. '2:beach'"
            )
        pos, first, quoted = group[0]
    weight *= sign
    if not quoted:
        item = _ITEM.fullmatch(first)
        if item is not None and len(group) == 1:
            return Term.item(item.group(1), weight)
        if _looks_like_image(first):
            if len(group) > 1:
                extra = group[1]
                raise InputDataError(
                    f"query {text!r}: image {first!r} at character {pos} is followed by "
                    f"{extra[1]!r} at character {extra[0]}; put ' + ' between terms, or quote "
                    "the text"
                )
            if not allow_paths:
                raise InputDataError(
                    f"query {text!r}: {first!r} at character {pos} names a file; here images "
                    'join the query by upload or "Add to query", or quote the term to search '
                    "it as text"
                )
            path = Path(first).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise InputDataError(
                    f"query {text!r}: no image file {first!r} (character {pos}, looked for "
                    f"{path}); fix the path, or quote the term to search it as text"
                )
            return Term.image(path, weight)
    words = " ".join(w for _, w, _ in group).strip()
    if not words:
        raise InputDataError(f"query {text!r}: empty quoted term at character {pos}")
    return Term.text(words, weight)


def _looks_like_image(word: str) -> bool:
    return word.startswith(("./", "../", "/", "~")) or word.lower().endswith(IMAGE_SUFFIXES)


def _needs_quotes(text: str) -> bool:
    return bool(
        _OPERATOR.search(text)
        or _WEIGHT.match(text)
        or _looks_like_image(text.split()[0] if text.split() else "")
    )


# -- feedback and collapse -------------------------------------------------------------------------


def rocchio(
    query: np.ndarray,
    relevant: Sequence[np.ndarray] | np.ndarray = (),
    non_relevant: Sequence[np.ndarray] | np.ndarray = (),
    alpha: float = ROCCHIO_DEFAULTS[0],
    beta: float = ROCCHIO_DEFAULTS[1],
    gamma: float = ROCCHIO_DEFAULTS[2],
) -> np.ndarray:
    """Rocchio feedback: ``alpha*q + beta*mean(relevant) - gamma*mean(non_relevant)``, normalised.

    Args:
        query: (D,) the query vector (unit).
        relevant / non_relevant: (N, D) stored vectors of hits marked "more / less like this".

    Returns:
        (D,) float32 unit vector.
    """
    total = alpha * _unit(np.asarray(query, dtype=np.float32).reshape(-1), "feedback query")
    if len(relevant):
        total = total + beta * np.mean(np.asarray(relevant, dtype=np.float32), axis=0)
    if len(non_relevant):
        total = total - gamma * np.mean(np.asarray(non_relevant, dtype=np.float32), axis=0)
    return _unit(total, "feedback query")


def collapse_hits(
    hits: Sequence[Hit], vectors: np.ndarray, threshold: float, offset: int = 0
) -> list[Hit]:
    """Fold near-duplicates: in rank order, a hit whose cosine similarity to a hit already kept
    is >= ``threshold`` is dropped and counted in the best such kept hit's ``similar``.

    Args:
        hits: a ranking, best first.
        vectors: (N, D) the hits' stored vectors, in the same order.
        threshold: cosine similarity in (-1, 1]; 1 folds only exact duplicates of direction.
        offset: the kept hits are re-ranked ``offset + 1, offset + 2 ...``.

    Returns:
        the kept hits, ranks renumbered, ``similar`` = how many were folded into each.
    """
    if not -1.0 < threshold <= 1.0:
        raise InputDataError(f"collapse threshold {threshold}: use a cosine in (-1, 1], e.g. 0.95")
    if len(hits) != len(vectors):
        raise InputDataError(f"collapse: {len(hits)} hits but {len(vectors)} vectors")
    if not hits:
        return []
    unit = np.asarray(vectors, dtype=np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    kept: list[int] = []
    counts: list[int] = []
    for i in range(len(hits)):
        if kept:
            sims = unit[kept] @ unit[i]  # (K,)
            best = int(np.argmax(sims))
            if sims[best] >= threshold - 1e-6:
                counts[best] += 1
                continue
        kept.append(i)
        counts.append(0)
    return [
        dataclasses.replace(hits[i], rank=offset + n + 1, similar=c)
        for n, (i, c) in enumerate(zip(kept, counts, strict=True))
    ]


def run_query(
    searcher: Searcher,
    query: CompositeQuery | np.ndarray,
    table: str,
    k: int = 10,
    offset: int = 0,
    *,
    mode: str = "vector",
    filters: Filters | None = None,
    where: str | None = None,
    keyword_text: str | None = None,
    relevant: Sequence[str] = (),
    non_relevant: Sequence[str] = (),
    feedback_weights: tuple[float, float, float] = ROCCHIO_DEFAULTS,
    collapse: float | None = None,
    version: Version | None = None,
) -> list[Hit]:
    """Search ``table`` with a compositional query (or a (D,) vector), feedback and collapse.

    Args:
        relevant / non_relevant: ids of items of ``table`` marked "more / less like this"; their
            stored vectors move the query (:func:`rocchio` with ``feedback_weights``).
        keyword_text: the words of keyword / hybrid mode; default: the query's positive text
            terms.
        collapse: fold hits closer than this cosine to a better hit (:func:`collapse_hits`).
            Pages then count *collapsed* hits: ``offset`` skips that many shown hits. The raw
            ranking is fetched ``COLLAPSE_WINDOW`` times deeper than ``offset + k`` (doubling
            until the page is full or the table ends, at most 10,000 rows), so a ``+N`` count
            covers the near-duplicates within that window.

        ``mode``, ``filters`` and ``where`` are those of :meth:`Searcher.search`; ``version``
        that of :meth:`Searcher.search_vector` (a vector query embedded for that version).

    Raises:
        InputDataError: an unknown feedback id, bad terms or paging.
    """
    version = version or searcher.version_of(table)  # one version for the whole query
    if isinstance(query, CompositeQuery):
        vector = query.embed(searcher, table, version)
        keyword_text = keyword_text if keyword_text is not None else query.keyword_text
    else:
        vector = _unit(np.asarray(query, dtype=np.float32).reshape(-1), "query vector")
    if relevant or non_relevant:
        marked = _item_vectors(searcher, [*relevant, *non_relevant], table)
        vector = rocchio(
            vector, marked[: len(relevant)], marked[len(relevant) :], *feedback_weights
        )
    options: dict[str, Any] = {
        "mode": mode,
        "filters": filters,
        "where": where,
        "keyword_text": keyword_text,
        "version": version,
    }
    if collapse is None:
        return searcher.search_vector(vector, table, k, offset, **options)
    if k < 1 or offset < 0:
        raise InputDataError(f"k must be >= 1 and offset >= 0, got k={k}, offset={offset}")
    depth = min(_MAX_RAW, COLLAPSE_WINDOW * (offset + k))
    while True:
        raw = searcher.search_vector(vector, table, depth, 0, **options)
        shown = collapse_hits(raw, searcher.get_vectors(table, [h.id for h in raw]), collapse)
        if len(shown) >= offset + k or len(raw) < depth or depth >= _MAX_RAW:
            break
        depth = min(_MAX_RAW, depth * 2)
    page = shown[offset : offset + k]
    return [dataclasses.replace(h, rank=offset + i + 1) for i, h in enumerate(page)]
