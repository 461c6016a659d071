"""The beit3-search page: describe an image or drop one, get images and texts back.

Started by ``beit3 app --db DIR`` (``streamlit run`` on this file, arguments after ``--``). The page
calls only :class:`indexer.Searcher`. It shows images as re-encoded thumbnails of files the index
holds, never a path taken from the browser, and turns every failure into a message in the page.

With a model that has a matcher, a typed query's images and an upload's texts are reranked: the
Searcher re-scores the top K vector hits with the fusion encoder once per query, and the page cuts
its pages (and the "hide weak matches" cutoff) from that one list, as ``Searcher.search(k, offset,
rerank=K, min_match=p)`` would.

State (``st.session_state``): ``active`` is the query whose results are shown (a typed text, an
uploaded image, or an indexed item that was clicked); ``pages`` counts the result pages loaded for
that query; ``memo`` keeps the search results of this session so a rerun does not search again.

Steering (issue 13): ``chips`` are terms added to the query ("Add to query" on a hit or the typed
text; a chip's minus toggle subtracts it); ``liked`` / ``disliked`` are hits marked "more / less
like this" (Rocchio on their stored vectors, re-queried in place); the sidebar's mode, filters and
near-duplicate collapse apply too. Any of them sends the search through
:func:`indexer.run_query` (the library's compositional search) and turns reranking off.

Feedback (issue 15): the same thumbs up / down also store a relevance label for the query on
screen (a typed text, or an indexed item) in the database (:mod:`indexer.feedback`), with the
model id and version that ranked the hit; ``beit3 improve`` trains on them. An uploaded image
steers only (no file the training could read back). The sidebar shows how many labels the
table holds, and each table's active version and model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st
from PIL import Image

from app._ui import (
    DEFAULT_COLLAPSE,
    DEFAULT_MIN_MATCH,
    DEFAULT_RERANK,
    EXPORT_LIMIT,
    MAX_UPLOAD_PIXELS,
    MODES,
    UPLOAD_TYPES,
    AppArgs,
    Chip,
    Rerank,
    Reranked,
    Steering,
    arrange_reranked,
    composite_query,
    content_key,
    cosine_only_note,
    db_labels,
    decode_upload,
    describe_db_problem,
    examples_from_names,
    examples_from_texts,
    format_match,
    format_score,
    hit_caption,
    hit_name,
    make_filters,
    md_escape,
    no_confident_match,
    parse_app_args,
    reranks,
    thumbnail,
)
from beit3 import Beit3Error

logger = logging.getLogger("app.streamlit_app")

PAGE_SIZES = (10, 20, 40, 80)
TEXT_HITS_PER_PAGE = 6
UPLOAD_WORKING_SIZE = 1024  # uploads are kept (and shown) at most this large
NO_TEXT_TABLE = "(none)"
MAX_RERANK = 512

# Tighter page margins; one-line file names under thumbnails (the button's tooltip has it whole).
_STYLE = """<style>
.block-container {padding-top: 2.2rem; padding-bottom: 2rem;}
[data-testid=stSidebarHeader] {height: 1.5rem;}
.st-key-image-grid strong {display: block; white-space: nowrap; overflow: hidden;
                           text-overflow: ellipsis; font-size: 0.85rem;}
.st-key-image-grid [data-testid=stMarkdownContainer] p {margin-bottom: 0;}
</style>"""


@dataclass(frozen=True)
class Query:
    """What the results on screen answer: ``kind`` is "text", "upload" or "item"."""

    kind: str
    key: tuple[Any, ...]
    label: str
    text: str = ""
    image: Image.Image | None = None
    table: str = ""
    item_id: Any = None


# --- loading (once per process) -------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the model and the index\u2026")
def load_searcher(db: str, model: str | None) -> Any:
    """Open the index and its model once per process, and do the lazy first-call work now."""
    from indexer import Searcher

    searcher = Searcher(db, model=model)
    _warm_up(searcher)
    return searcher


def _warm_up(searcher: Any) -> None:
    """Run one text and one image query per table so the first real query is not the slow one
    (and, with a matcher, one reranked query per table)."""
    probe = Image.new("RGB", (64, 64), (128, 128, 128))
    matcher = has_matcher(searcher)
    for name, info in searcher.tables.items():
        if not info.count:
            continue
        for query in ("warm up", probe):
            pair = isinstance(query, str) == (info.modality == "image")
            try:
                searcher.search(query, name, k=1, rerank=2 if matcher and pair else 0)
            except Exception:  # noqa: BLE001 - warming is best effort; a real query reports errors
                logger.warning("warm-up query on table %s failed", name, exc_info=True)


def has_matcher(searcher: Any) -> bool:
    """Whether the index's model can rerank (``Beit3WithMatcher``)."""
    return bool(getattr(searcher.checkpoint.model, "has_matcher", False))


@st.cache_data(max_entries=4096, show_spinner=False)
def _thumbnail_bytes(path: str, mtime_ns: int) -> bytes | None:
    del mtime_ns  # part of the cache key only: a changed file gets a new thumbnail
    image = thumbnail(path)
    if image is None:
        return None
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def indexed_thumbnail(path: str | None) -> bytes | None:
    """Thumbnail of an image the index holds (``path`` comes from a Hit, never from the page)."""
    if not path:
        return None
    try:
        mtime_ns = os.stat(path).st_mtime_ns
    except OSError:
        return None
    return _thumbnail_bytes(path, mtime_ns)


@st.cache_data(max_entries=64, show_spinner=False)
def example_queries(
    db: str, image_table: str | None, text_table: str | None, _searcher: Any
) -> list[str]:
    """Two or three example queries drawn from what the index holds."""
    try:
        if text_table:
            return examples_from_texts(
                h.text for h in _searcher.search("a photo", text_table, k=40)
            )
        if image_table:
            return examples_from_names(
                h.path for h in _searcher.search("a photo", image_table, k=40)
            )
    except Exception:  # noqa: BLE001 - examples are a nicety; never let them break the page
        logger.warning("could not pick example queries for %s", db, exc_info=True)
    return []


# --- state changes (widget callbacks run before the page is redrawn) --------------------------


def _state() -> Any:
    return st.session_state


def _set_active(query: Query | None) -> None:
    _state().active = query
    _state().notice = None
    _state().upload_error = None
    _state().liked = ()  # feedback belongs to the query it was given for
    _state().disliked = ()


def _on_text_submit() -> None:
    text = " ".join(str(_state().get("q", "")).split())
    if not text:
        _set_active(None)
        _state().notice = "empty"
        return
    _state().before_submit = _state().get("active")  # for "Add", see _on_add_text
    _set_active(Query("text", ("text", text), text, text=text))
    _state().uploader_nonce = _state().get("uploader_nonce", 0) + 1  # clear a previous upload


def _on_example(text: str) -> None:
    _state().q = text
    _on_text_submit()


def _on_upload(widget_key: str, max_mb: int) -> None:
    upload = _state().get(widget_key)
    _state().upload_error = None
    if upload is None:
        if (_state().get("active") or Query("", (), "")).kind == "upload":
            _set_active(None)
        return
    data = upload.getvalue()
    try:
        image = decode_upload(data, upload.name, max_mb=max_mb)
    except Beit3Error as exc:
        _state().upload_error = str(exc)
        return
    key = ("upload", content_key(data))
    image.thumbnail((UPLOAD_WORKING_SIZE, UPLOAD_WORKING_SIZE))  # the model sees <= 384 px anyway
    _set_active(Query("upload", key, upload.name, image=image))
    _state().q = ""


def _on_item(table: str, item_id: Any, label: str) -> None:
    _set_active(Query("item", ("item", table, item_id), label, table=table, item_id=item_id))
    _state().q = ""


def _on_clear() -> None:
    _set_active(None)
    _state().q = ""
    _state().chips = ()
    _state().uploader_nonce = _state().get("uploader_nonce", 0) + 1


def _on_add_chip(chip: Chip) -> None:
    chips = tuple(_state().get("chips", ()))
    if chip.key not in {c.key for c in chips}:
        _state().chips = (*chips, chip)


def _on_add_text() -> None:
    text = " ".join(str(_state().get("q", "")).split())
    if not text:
        _state().notice = "empty"
        return
    _state().notice = None
    active = _state().get("active")
    if active is not None and active.kind == "text" and active.text == text:
        # Leaving the box to press "Add" submitted the words as a new query first (the
        # box's on_change runs before the button's): go back to the query they join.
        _set_active(_state().get("before_submit"))
    _on_add_chip(Chip("text", text, text=text))
    _state().q = ""


def _on_toggle_chip(index: int) -> None:
    chips = list(_state().get("chips", ()))
    chips[index] = dataclasses.replace(chips[index], negative=not chips[index].negative)
    _state().chips = tuple(chips)


def _on_remove_chip(index: int) -> None:
    chips = list(_state().get("chips", ()))
    del chips[index]
    _state().chips = tuple(chips)


def _on_feedback(item_id: str, more: bool, record: dict[str, Any] | None = None) -> None:
    """Mark a hit "more like this" (``more``) or "less like this"; the page re-queries. With a
    ``record`` (:func:`feedback_record`) the mark is also stored as a relevance label."""
    liked = tuple(i for i in _state().get("liked", ()) if i != item_id)
    disliked = tuple(i for i in _state().get("disliked", ()) if i != item_id)
    _state().liked = (*liked, item_id) if more else liked
    _state().disliked = disliked if more else (*disliked, item_id)
    _state().feedback_error = None
    if record is None:
        return
    from indexer.feedback import FeedbackStore

    fields = dict(record)
    db = fields.pop("db")
    try:
        FeedbackStore(db).add(label=1 if more else -1, **fields)
    except (Beit3Error, OSError) as exc:
        _state().feedback_error = f"The feedback was not stored: {exc}"


def _on_reset_feedback() -> None:
    _state().liked = ()
    _state().disliked = ()


def _on_more(section: str) -> None:
    _state().pages[section] = _state().pages.get(section, 1) + 1


# --- searching -------------------------------------------------------------------------------


def _search_page(
    searcher: Any,
    db: str,
    query: Query,
    table: str,
    k: int,
    offset: int,
    steer: Steering | None = None,
) -> list:
    """One page of hits for ``query`` from ``table``, remembered for this session."""
    memo: dict = _state().setdefault("memo", {})
    key = (db, table, query.key, k, offset, steer.key if steer is not None else None)
    if key not in memo:
        if len(memo) > 256:
            memo.clear()
        if steer is not None and not steer.is_plain(query.text):
            memo[key] = steered_hits(searcher, query, table, k, offset, steer)
        elif query.kind == "item":
            memo[key] = searcher.search_similar(
                query.table, query.item_id, table, k=k, offset=offset
            )
        else:
            source = query.text if query.kind == "text" else query.image
            memo[key] = searcher.search(source, table, k=k, offset=offset)
    return memo[key]


def steered_hits(
    searcher: Any, query: Query, table: str, k: int, offset: int, steer: Steering
) -> list:
    """A page of the compositional, feedback, filtered, collapsed search (the library's
    :func:`indexer.run_query`); filters only for image tables."""
    from indexer import run_query

    composite = composite_query(
        query.kind, query.text, query.image, query.table, query.item_id, steer.chips
    )
    is_image = searcher.tables[table].modality == "image"
    return run_query(
        searcher,
        composite,
        table,
        k,
        offset,
        mode=steer.mode,
        filters=steer.filters if is_image else None,
        relevant=steer.liked,
        non_relevant=steer.disliked,
        collapse=steer.collapse,
    )


def export_data(searcher: Any, query: Query, table: str, steer: Steering, fmt: str) -> Any:
    """A callable for a download button: the section's hits (every page, up to EXPORT_LIMIT)
    in ``fmt`` (the CLI's exporter, app.export); runs when the button is pressed."""

    def build() -> str:
        from app.export import format_hits

        if not steer.is_plain(query.text):
            hits = steered_hits(searcher, query, table, EXPORT_LIMIT, 0, steer)
        elif query.kind == "item":
            hits = searcher.search_similar(query.table, query.item_id, table, k=EXPORT_LIMIT)
        else:
            source = query.text if query.kind == "text" else query.image
            hits = searcher.search(source, table, k=EXPORT_LIMIT)
        return format_hits(hits, fmt)

    return build


def reranked_hits(searcher: Any, db: str, query: Query, table: str, candidates: int) -> list:
    """The query's top ``candidates`` reranked by the fusion encoder, ordered by match: one
    Searcher call per query; pages and the cutoff are cut from this list."""
    memo: dict = _state().setdefault("memo", {})
    key = (db, table, query.key, "rerank", candidates)
    if key not in memo:
        if len(memo) > 256:
            memo.clear()
        source = query.text if query.kind == "text" else query.image
        memo[key] = searcher.search(source, table, k=candidates, rerank=candidates)
    return memo[key]


def find_hits(
    searcher: Any, db: str, query: Query, table: str, k: int, pages: int, rerank: Rerank
) -> Reranked:
    """The reranked section's hits for the first ``pages`` pages of ``k``."""
    ranked = reranked_hits(searcher, db, query, table, rerank.candidates)
    return arrange_reranked(ranked, rerank.min_match, k * pages)


def collect_hits(
    searcher: Any,
    db: str,
    query: Query,
    table: str,
    k: int,
    pages: int,
    steer: Steering | None = None,
) -> tuple[list, bool]:
    """Hits of the first ``pages`` pages, each shown once; and whether more exist."""
    hits: list = []
    total = searcher.tables[table].count
    more = True
    for page in range(pages):
        batch = _search_page(searcher, db, query, table, k, page * k, steer)
        hits.extend(batch)
        if len(batch) < k or (page + 1) * k >= total:
            more = False
            break
    # Leave out the clicked item itself, and any hit a previous page already showed.
    seen = {query.item_id} if query.kind == "item" and query.table == table else set()
    unique = []
    for hit in hits:
        if hit.id not in seen:
            seen.add(hit.id)
            unique.append(hit)
    return unique, more


def _run_safely(what: str, fn: Any, *args: Any) -> Any:
    """Call ``fn``; on failure show one friendly line (never a traceback) and return None."""
    try:
        return fn(*args)
    except Beit3Error as exc:
        st.error(f"{what}: {md_escape(str(exc))}")
    except Exception as exc:  # noqa: BLE001 - the page shows a message; the log has the traceback
        logger.exception("%s failed", what)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        st.error(
            f"{what} failed ({type(exc).__name__}{': ' + md_escape(first) if first else ''}). "
            "The server log has the details."
        )
    return None


# --- drawing ---------------------------------------------------------------------------------


def _code(value: object) -> str:
    """Text for inside a Markdown code span (where backslash escapes would show)."""
    return str(value).replace("`", "'")


def draw_sidebar(args: AppArgs) -> tuple[Path | None, str]:
    with st.sidebar:
        st.markdown("## \U0001f50e beit3-search")
        labels = db_labels(args.dbs)
        if not labels:
            return None, ""
        if len(labels) > 1:
            label = st.selectbox("Database", list(labels), key="db")
        else:
            label = next(iter(labels))
            st.markdown(f"**Database** \u00b7 `{_code(label)}`")
        return labels[label], label


def draw_index_panel(
    searcher: Any, db: Path
) -> tuple[str | None, str | None, int, Rerank | None, Steering]:
    """Table pickers, page size, reranking, steering, model and index size in the sidebar."""
    images = [n for n, t in searcher.tables.items() if t.modality == "image"]
    texts = [n for n, t in searcher.tables.items() if t.modality == "text"]
    with st.sidebar:
        image_table = (
            st.selectbox("Image table", images, key="image_table")
            if len(images) > 1
            else (images[0] if images else None)
        )
        text_table = None
        if len(texts) > 1:
            choice = st.selectbox("Text table", [*texts, NO_TEXT_TABLE], key="text_table")
            text_table = None if choice == NO_TEXT_TABLE else choice
        elif texts:
            text_table = texts[0]
        k = st.select_slider("Results per page", PAGE_SIZES, value=PAGE_SIZES[0], key="k")
        rerank = draw_rerank_controls(searcher)
        steer = draw_steer_controls(searcher)
        st.divider()
        st.markdown("**Index**")
        for name, info in searcher.tables.items():
            unit = "images" if info.modality == "image" else "texts"
            st.markdown(f"`{_code(name)}` \u00b7 {info.count:,} {unit}")
            version = getattr(info, "version", None)
            if version:
                st.caption(f"version {_code(version)} \u00b7 `{_code(info.model_id)}`")
        draw_feedback_count(db, image_table)
        first = next(iter(searcher.tables.values()), None)
        if first is not None:
            st.caption(f"{first.backend} \u00b7 {first.dim}-d vectors \u00b7 `{_code(db)}`")
        st.markdown("**Model**")
        st.markdown(f"`{_code(searcher.model_id)}`")
        checkpoint = getattr(searcher.checkpoint, "path", searcher.checkpoint)
        st.caption(f"checkpoint `{_code(checkpoint)}`")
    return image_table, text_table, int(k), rerank, steer


def feedback_count(db: str | Path, table: str | None) -> int | None:
    """Labels stored for hits of ``table`` (None when the database cannot hold any)."""
    from indexer.feedback import FEEDBACK_NAME, FeedbackStore

    if not (Path(db) / FEEDBACK_NAME).is_file():
        return 0  # viewing a database does not create its feedback file
    try:
        return FeedbackStore(db).count(table)
    except (Beit3Error, OSError):
        return None


def draw_feedback_count(db: Path, table: str | None) -> None:
    count = feedback_count(db, table)
    if count is None or table is None:
        return
    st.caption(
        f"{count:,} feedback label{'s' * (count != 1)} stored for `{_code(table)}` "
        f"(\U0001f44d / \U0001f44e on a hit); `beit3 improve` trains on them",
        help="Each thumbs up / down on a hit of a typed query or an indexed item is stored "
        "in the database as a relevance label for that query.",
    )


def feedback_record(searcher: Any, db: str, query: Query, table: str) -> dict[str, Any] | None:
    """What a thumbs up / down on a hit of ``table`` stores for ``query`` (the hit's id, path
    and text are added per hit); None for an upload or terms only."""
    info = searcher.tables.get(table)
    if info is None or query.kind not in ("text", "item"):
        return None
    record: dict[str, Any] = {
        "db": db,
        "hit_table": table,
        "model_id": info.model_id,
        "version": getattr(info, "version", None) or None,
    }
    if query.kind == "text":
        return {**record, "query_text": query.text}
    item = searcher.get(query.table, query.item_id)
    return {
        **record,
        "query_id": str(query.item_id),
        "query_table": query.table,
        "query_path": getattr(item, "path", None),
    }


def draw_steer_controls(searcher: Any) -> Steering:
    """Mode, near-duplicate collapse and filters (in the sidebar), with the page's chips and
    feedback: the :class:`Steering` of this run."""
    st.divider()
    mode = st.segmented_control(
        "Search mode",
        MODES,
        default=MODES[0],
        key="mode",
        help="vector: by meaning; keyword: the words of file names, folders and captions "
        "(texts: their words); hybrid: both, fused by rank.",
    )
    collapse_on = st.toggle(
        "Collapse near-duplicates",
        value=False,
        key="collapse",
        help="Hits closer than the threshold (cosine) to a better hit show once, with a "
        "“+N similar” count.",
    )
    threshold = st.slider(
        "Duplicate threshold",
        min_value=0.80,
        max_value=1.0,
        value=DEFAULT_COLLAPSE,
        step=0.01,
        key="collapse_threshold",
        disabled=not collapse_on,
    )
    with st.expander("Filters (images)", expanded=False):
        under = st.text_input("Folder", key="f_under", help="Comma-separated folders.")
        left, right = st.columns(2)
        min_width = left.number_input("Min width (px)", min_value=0, value=0, key="f_min_width")
        min_height = right.number_input("Min height", min_value=0, value=0, key="f_min_height")
        types = st.multiselect("File type", list(UPLOAD_TYPES), key="f_types")
        after = st.date_input("Modified after", value=None, key="f_after")
        before = st.date_input("Modified before", value=None, key="f_before")
        camera = st.text_input("Camera", key="f_camera", help="Part of the EXIF make/model.")
    return Steering(
        mode=str(mode or MODES[0]),
        filters=make_filters(under, types, after, before, camera, min_width, min_height),
        collapse=float(threshold) if collapse_on else None,
        chips=tuple(_state().get("chips", ())),
        liked=tuple(_state().get("liked", ())),
        disliked=tuple(_state().get("disliked", ())),
    )


def draw_rerank_controls(searcher: Any) -> Rerank | None:
    """The reranking switches (in the sidebar); None when the page does not rerank."""
    label = "Rerank with the fusion encoder"
    if not has_matcher(searcher):
        st.toggle(label, value=False, disabled=True, key="rerank-unavailable")
        st.caption("This model has no matcher (fine-tune with `--itm`).")
        return None
    on = st.toggle(
        label,
        value=True,
        key="rerank",
        help="Re-score the top candidates of a text \u2192 image or image \u2192 text search "
        "with the fusion encoder, which reads the query and each candidate together, and order "
        "them by its calibrated probability that they match.",
    )
    candidates = st.number_input(
        "Candidates to rerank",
        min_value=1,
        max_value=MAX_RERANK,
        value=DEFAULT_RERANK,
        step=8,
        key="rerank_k",
        disabled=not on,
        help="The vector search's top N; results come from these only.",
    )
    hide = st.toggle("Hide weak matches", value=True, key="hide_weak", disabled=not on)
    cutoff = st.slider(
        "Match cutoff",
        min_value=0.0,
        max_value=1.0,
        value=DEFAULT_MIN_MATCH,
        step=0.05,
        key="min_match",
        disabled=not (on and hide),
        help="A calibrated probability: of the hits at 0.8, about 8 in 10 match.",
    )
    if not on:
        return None
    return Rerank(int(candidates), float(cutoff) if hide else None)


def draw_inputs(args: AppArgs, examples: list[str]) -> None:
    left, right = st.columns([3, 2], gap="large")
    with left, st.container(horizontal=True, vertical_alignment="bottom", key="query-row"):
        st.text_input(
            "Describe an image",
            key="q",
            on_change=_on_text_submit,
            placeholder=f"e.g. {examples[0]}" if examples else "e.g. a dog on a beach",
            max_chars=300,
        )
        st.button("Search", type="primary", key="search", on_click=_on_text_submit)
        st.button(
            "Add",
            key="add-text",
            icon=":material/add:",
            on_click=_on_add_text,
            help="Add the words to the query as a term (the chips above the results); "
            "the query syntax works in the box too: cat + hat - 2:snow",
        )
    if examples:
        with left, st.container(horizontal=True, vertical_alignment="center", key="examples"):
            st.caption("Try:", width="content")
            for i, text in enumerate(examples):
                st.button(
                    text, key=f"example-{i}", type="tertiary", on_click=_on_example, args=(text,)
                )
    with right:
        widget_key = f"upload-{_state().get('uploader_nonce', 0)}"
        st.file_uploader(
            "\u2026or search with an image",
            type=list(UPLOAD_TYPES),
            key=widget_key,
            max_upload_size=args.max_upload_mb,
            on_change=_on_upload,
            args=(widget_key, args.max_upload_mb),
            help=f"Up to {args.max_upload_mb} MB and {MAX_UPLOAD_PIXELS // 1_000_000} megapixels.",
        )
        if _state().get("upload_error"):
            st.warning(_state().upload_error, icon=":material/broken_image:")
    if _state().get("notice") == "empty":
        hint = f" such as \u201c{examples[0]}\u201d" if examples else ""
        st.info(f"Type a few words to search{hint}, or drop an image.", icon=":material/edit:")


def draw_query_banner(searcher: Any, query: Query, steer: Steering) -> None:
    with st.container(horizontal=True, vertical_alignment="center", key="query-banner"):
        if query.kind == "chips":
            st.markdown("Results for **your terms**")
        elif query.kind == "text":
            st.markdown(f"Results for **\u201c{md_escape(query.text)}\u201d**")
        elif query.kind == "upload":
            st.image(query.image, width=56)  # at most 1024 px: kept small by _on_upload
            st.markdown(f"Images and texts like **{md_escape(query.label)}** (your upload)")
            st.button(
                ":material/add:",
                key="add-upload",
                type="tertiary",
                help="Add this image to the query as a term (it stays when you type new words)",
                on_click=_on_add_chip,
                args=(Chip("image", query.label, item_id=query.key, image=query.image),),
            )
        else:
            hit = searcher.get(query.table, query.item_id)
            thumb = indexed_thumbnail(hit.path) if hit is not None else None
            if thumb is not None:
                st.image(thumb, width=56)
            st.markdown(f"More like **{md_escape(query.label)}**")
        st.button(
            "Clear", key="clear", type="tertiary", icon=":material/close:", on_click=_on_clear
        )
    draw_chips(steer)


def draw_chips(steer: Steering) -> None:
    """The added terms as chips (click: toggle minus; x: remove) and the feedback given."""
    if not steer.chips and not steer.liked and not steer.disliked:
        return
    with st.container(horizontal=True, vertical_alignment="center", key="chips"):
        for i, chip in enumerate(steer.chips):
            sign = "\u2212" if chip.negative else "+"
            st.button(
                f"{sign} {chip.label}",
                key=f"chip-{i}",
                help="Click to " + ("add" if chip.negative else "subtract") + " this term",
                on_click=_on_toggle_chip,
                args=(i,),
            )
            st.button(
                ":material/close:",
                key=f"chip-remove-{i}",
                type="tertiary",
                help="Remove this term",
                on_click=_on_remove_chip,
                args=(i,),
            )
        if steer.liked or steer.disliked:
            st.caption(
                f"feedback: {len(steer.liked)} more like, {len(steer.disliked)} less like",
                width="content",
            )
            st.button(
                "Reset feedback", key="reset-feedback", type="tertiary", on_click=_on_reset_feedback
            )


def _search_section(
    what: str,
    searcher: Any,
    db: str,
    query: Query,
    table: str,
    k: int,
    section: str,
    rerank: Rerank | None,
    steer: Steering | None = None,
) -> tuple[list, bool, Reranked | None, str] | None:
    """(hits, more, reranked, note) of a result section, in cosine order or reranked; ``note``
    says why a section stays in cosine order with reranking on. None after a failure (the page
    shows why)."""
    pages = _state().pages.get(section, 1)
    modality = "image" if section == "images" else "text"
    steered = steer is not None and not steer.is_plain(query.text)
    if rerank is None or not reranks(query.kind, modality) or steered:
        found = _run_safely(what, collect_hits, searcher, db, query, table, k, pages, steer)
        if found is None:
            return None
        note = cosine_only_note(query.kind, modality) if rerank is not None else ""
        if steered and rerank is not None:
            note = "Reranking is off while the query is steered (terms, feedback, mode, filters)."
        return found[0], found[1], None, note
    arranged = _run_safely(what, find_hits, searcher, db, query, table, k, pages, rerank)
    if arranged is None:
        return None
    return arranged.hits, arranged.more, arranged, ""


def _rerank_summary(
    query: Query, rerank: Rerank, arranged: Reranked, heading: str
) -> tuple[str, str]:
    """(heading, note) of a reranked section; when nothing reaches the cutoff, shows the plain
    "no confident match" message first and heads the nearest candidates "Not confident"."""
    if arranged.confident:
        hidden = ""
        if arranged.hidden and rerank.min_match is not None:
            hidden = f" \u00b7 {arranged.hidden} below {rerank.min_match:.0%} hidden"
        return heading, (
            f"Top {arranged.candidates} reranked by the fusion encoder, ordered by match{hidden}."
        )
    label = query.text if query.kind == "text" else query.label
    st.warning(
        no_confident_match(label, arranged.candidates, rerank.min_match or 0.0),
        icon=":material/help:",
    )
    return "Not confident", "The nearest candidates, ordered by match: for reference, not results."


def draw_image_hits(
    searcher: Any,
    db: str,
    query: Query,
    table: str,
    k: int,
    can_search_texts: bool,
    rerank: Rerank | None = None,
    steer: Steering | None = None,
) -> None:
    found = _search_section("Image search", searcher, db, query, table, k, "images", rerank, steer)
    if found is None:
        return
    hits, more, arranged, note = found
    heading = "Images"
    if arranged is not None and rerank is not None and hits:
        heading, note = _rerank_summary(query, rerank, arranged, heading)
    st.markdown(f"#### {heading} \u00b7 {len(hits)}")
    if note:
        st.caption(note)
    if not hits:
        st.info("No images match. Try other words, or another table in the sidebar.")
        return
    if _state().get("feedback_error"):
        st.warning(_state().feedback_error, icon=":material/error:")
    record = feedback_record(searcher, db, query, table)
    grid = st.grid("auto", min_column_width=140, gap="small", border=True, key="image-grid")
    for hit in hits:
        name = hit_name(hit.path, hit.id, hit.text)
        with grid.cell():
            thumb = indexed_thumbnail(hit.path)
            if thumb is None:
                st.markdown(":material/hide_image: *file missing*")
            else:
                st.image(thumb, width="stretch")
            st.markdown(f"**{md_escape(name)}**")
            st.caption(hit_caption(hit))
            st.button(
                "Similar",
                key=f"similar-{table}-{hit.id}",
                icon=":material/image_search:",
                width="stretch",
                on_click=_on_item,
                args=(table, hit.id, name),
                help=f"Search with {name}" + (" (images and texts)" if can_search_texts else ""),
            )
            draw_hit_actions(table, hit, name, record)
    if steer is not None:
        draw_downloads(searcher, query, table, steer, "images")
    if more:
        st.button(
            "More results",
            key="more-images",
            icon=":material/expand_more:",
            on_click=_on_more,
            args=("images",),
        )


def draw_hit_actions(
    table: str, hit: Any, label: str, record: dict[str, Any] | None = None
) -> None:
    """A hit's steering buttons: add it to the query, more like this, less like this; with a
    ``record`` (:func:`feedback_record`) the thumbs also store a relevance label."""
    liked = hit.id in _state().get("liked", ())
    disliked = hit.id in _state().get("disliked", ())
    stored = None
    if record is not None:
        stored = {**record, "hit_id": hit.id, "hit_path": hit.path, "hit_text": hit.text}
    note = " (stored as feedback for this query)" if stored else ""
    with st.container(horizontal=True, gap="small", key=f"actions-{table}-{hit.id}"):
        st.button(
            ":material/add:",
            key=f"add-{table}-{hit.id}",
            type="tertiary",
            help=f"Add {label} to the query",
            on_click=_on_add_chip,
            args=(Chip("item", label, table=table, item_id=hit.id),),
        )
        st.button(
            ":material/thumb_up:",
            key=f"like-{table}-{hit.id}",
            type="primary" if liked else "tertiary",
            help="Relevant: more like this" + note,
            on_click=_on_feedback,
            args=(hit.id, True, stored),
        )
        st.button(
            ":material/thumb_down:",
            key=f"dislike-{table}-{hit.id}",
            type="primary" if disliked else "tertiary",
            help="Not relevant: less like this" + note,
            on_click=_on_feedback,
            args=(hit.id, False, stored),
        )


def draw_downloads(searcher: Any, query: Query, table: str, steer: Steering, section: str) -> None:
    with st.container(horizontal=True, key=f"downloads-{section}"):
        for fmt in ("json", "csv"):
            st.download_button(
                f"Download {fmt.upper()}",
                data=export_data(searcher, query, table, steer, fmt),
                file_name=f"beit3-{section}.{fmt}",
                mime="application/json" if fmt == "json" else "text/csv",
                key=f"download-{section}-{fmt}",
                icon=":material/download:",
                on_click="ignore",
                help=f"Every page of these results, up to {EXPORT_LIMIT} hits",
            )


def draw_text_hits(
    searcher: Any,
    db: str,
    query: Query,
    table: str,
    image_table: str | None,
    rerank: Rerank | None = None,
    steer: Steering | None = None,
) -> None:
    found = _search_section(
        "Text search", searcher, db, query, table, TEXT_HITS_PER_PAGE, "texts", rerank, steer
    )
    if found is None:
        return
    hits, more, arranged, note = found
    heading = "Texts"
    if arranged is not None and rerank is not None and hits:
        heading, note = _rerank_summary(query, rerank, arranged, heading)
    st.markdown(f"#### {heading} \u00b7 {len(hits)}")
    if note:
        st.caption(note)
    if not hits:
        st.info("No texts match.")
        return
    record = feedback_record(searcher, db, query, table)
    with st.container(border=True, key="text-hits"):
        for hit in hits:
            with st.container(
                horizontal=True, vertical_alignment="center", wrap=False, key=f"text-hit-{hit.rank}"
            ):
                match = "" if hit.match is None else f" \u00b7 {format_match(hit.match)}"
                st.markdown(f"`{format_score(hit.score)}{match}`", width="content")
                st.markdown(md_escape(hit.text or str(hit.id)), width="stretch")
                if image_table:
                    label = (hit.text or str(hit.id))[:60]
                    st.button(
                        ":material/image_search:",
                        key=f"find-{table}-{hit.id}",
                        type="tertiary",
                        help="Find images that match this text",
                        on_click=_on_item,
                        args=(table, hit.id, label),
                    )
                # In a popover: the text column is narrow.
                with st.popover(
                    ":material/more_vert:",
                    type="tertiary",
                    help="Add to the query, more / less like this",
                    key=f"text-actions-{hit.id}",
                ):
                    draw_hit_actions(table, hit, (hit.text or str(hit.id))[:60], record)
    if steer is not None:
        draw_downloads(searcher, query, table, steer, "texts")
    if more:
        st.button(
            "More texts",
            key="more-texts",
            icon=":material/expand_more:",
            on_click=_on_more,
            args=("texts",),
        )


def draw_welcome(searcher: Any, examples: list[str]) -> None:
    sizes = [
        f"{t.count:,} {'images' if t.modality == 'image' else 'texts'}"
        for t in searcher.tables.values()
    ]
    tip = f" For example: \u201c{examples[0]}\u201d." if examples else ""
    st.info(
        f"The index holds {' and '.join(sizes)}. Describe what you are looking for, or drop "
        f"an image to find similar ones and the texts that describe it.{tip}",
        icon=":material/travel_explore:",
    )


def main() -> None:
    st.set_page_config(page_title="beit3-search", page_icon="\U0001f50e", layout="wide")
    st.html(_STYLE)
    args = parse_app_args(sys.argv[1:])
    db, db_label = draw_sidebar(args)
    st.markdown("### Search images by description, or by example")
    for message in args.errors:
        st.warning(message)
    if db is None:
        st.error(
            "No database given. Start the app with `beit3 app --db DIR`, where DIR is a "
            "folder written by `beit3 index`."
        )
        return
    problem = describe_db_problem(db)
    if problem:
        st.error(problem, icon=":material/database:")
        return
    model = str(args.model) if args.model else None
    searcher = _run_safely(f"Opening `{db}`", load_searcher, str(db.resolve()), model)
    if searcher is None:
        return
    if not any(t.count for t in searcher.tables.values()):
        st.info(
            f"The database `{db}` has no items yet. Add some with "
            f"`beit3 index images PHOTOS/ --db {db}`.",
            icon=":material/database:",
        )
        return
    image_table, text_table, k, rerank, steer = draw_index_panel(searcher, db)
    examples = example_queries(str(db.resolve()), image_table, text_table, searcher)
    draw_inputs(args, examples)

    query: Query | None = _state().get("active")
    if _state().get("active_db") != db_label:
        _state().active_db = db_label
        if query is not None and query.kind == "item":  # its id belongs to the other database
            query = _state().active = None
    if query is None and steer.chips:
        query = Query("chips", ("chips",), "your terms")
    if query is None:
        draw_welcome(searcher, examples)
        return
    signature = (db_label, image_table, text_table, k, rerank, query.key, steer.key)
    if _state().get("pages", {}).get("signature") != signature:
        _state().pages = {"signature": signature}  # a new query starts from the first page
    draw_query_banner(searcher, query, steer)
    if text_table and image_table:
        images, texts = st.columns([3, 1], gap="medium")
    else:
        images = texts = st.container()
    if image_table:
        with images:
            draw_image_hits(
                searcher, str(db), query, image_table, k, bool(text_table), rerank, steer
            )
    if text_table:
        with texts:
            draw_text_hits(searcher, str(db), query, text_table, image_table, rerank, steer)


main()
