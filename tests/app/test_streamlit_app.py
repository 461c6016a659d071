"""The search page's logic, driven by Streamlit's AppTest (no browser), on a real tiny index.

Each test compares what the page shows (names, order, scores) with what the Searcher returns
for the same query, so a wrong table, page or ordering fails here.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from app._ui import (
    arrange_reranked,
    decode_upload,
    examples_from_names,
    examples_from_texts,
    format_match,
    md_escape,
    parse_app_args,
)
from app.cli import cli
from app.cli_app import APP_FILE

QUERY = "a red circle"
PAGE = 10  # the page's default number of image results per page
TEXT_PAGE = 6


def open_page(monkeypatch: pytest.MonkeyPatch, *args: str) -> AppTest:
    """Run the page as `beit3 app` would start it, with ``args`` after ``--``."""
    monkeypatch.setattr(sys, "argv", [str(APP_FILE), *args])
    return AppTest.from_file(str(APP_FILE), default_timeout=60).run()


def _block(at: AppTest, key: str):
    try:
        return at.get_by_key(key)
    except KeyError:
        return None


def cards(at: AppTest) -> list[tuple[str, str]]:
    """(name markdown, caption) of each image card, in page order."""
    grid = _block(at, "image-grid")
    if grid is None:
        return []
    return list(zip([m.value for m in grid.markdown], [c.value for c in grid.caption], strict=True))


def expected_cards(hits) -> list[tuple[str, str]]:
    return [
        (f"**{md_escape(Path(h.path).name)}**", f"score {h.score:.3f} \u00b7 #{h.rank}")
        for h in hits
    ]


def text_rows(at: AppTest) -> list[tuple[str, str]]:
    """(score, text) of each text hit, in page order."""
    block = _block(at, "text-hits")
    if block is None:
        return []
    values = [m.value for m in block.markdown]
    return list(zip(values[::2], values[1::2], strict=True))


def no_traceback(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch, app_db: Path) -> AppTest:
    at = open_page(monkeypatch, "--db", str(app_db))
    no_traceback(at)
    return at


def search(at: AppTest, text: str) -> AppTest:
    at.text_input(key="q").input(text).run()
    no_traceback(at)
    return at


def test_text_query_shows_image_hits_in_searcher_order(page, app_searcher):
    search(page, QUERY)
    assert page.markdown[1].value == f"Results for **\u201c{QUERY}\u201d**"
    want = app_searcher.search(QUERY, "images", k=PAGE)
    assert cards(page) == expected_cards(want)
    assert len(_block(page, "image-grid").image) == PAGE  # every card has its thumbnail


def test_text_query_also_lists_matching_texts(page, app_searcher):
    search(page, QUERY)
    want = app_searcher.search(QUERY, "texts", k=TEXT_PAGE)
    rows = [(f"`{h.score:.3f}`", md_escape(h.text)) for h in want]
    assert text_rows(page) == rows


def test_more_results_loads_the_next_page_until_the_index_ends(page, app_searcher):
    search(page, QUERY)
    page.button(key="more-images").click().run()
    want = app_searcher.search(QUERY, "images", k=PAGE) + app_searcher.search(
        QUERY, "images", k=PAGE, offset=PAGE
    )
    assert cards(page) == expected_cards(want)
    page.button(key="more-images").click().run()
    page.button(key="more-images").click().run()  # 40 asked for, 32 in the index
    assert len(cards(page)) == 32
    assert [c[1].split("#")[1] for c in cards(page)] == [str(i) for i in range(1, 33)]
    assert not [b for b in page.button if b.key == "more-images"]


def test_page_size_from_the_sidebar(page, app_searcher):
    page.select_slider(key="k").set_value(20).run()
    search(page, QUERY)
    assert cards(page) == expected_cards(app_searcher.search(QUERY, "images", k=20))


def test_empty_query_asks_for_words(page):
    page.text_input(key="q").input("   ").run()
    page.button(key="search").click().run()
    no_traceback(page)
    assert any("Type a few words to search" in i.value for i in page.info)
    assert not page.grid


def test_example_button_runs_its_query(page, app_searcher):
    example = page.button(key="example-0").label
    page.button(key="example-0").click().run()
    assert page.text_input(key="q").value == example
    assert cards(page) == expected_cards(app_searcher.search(example, "images", k=PAGE))


def test_examples_come_from_the_indexed_texts(page):
    labels = [b.label for b in page.button if (b.key or "").startswith("example-")]
    captions = {
        f"a {c} {s}"
        for c in ("red", "green", "blue", "yellow", "purple", "orange", "black", "cyan")
        for s in ("circle", "square", "triangle", "cross")
    }
    assert 2 <= len(labels) <= 3 and set(labels) <= captions


def test_similar_searches_with_the_clicked_image(page, app_searcher):
    search(page, QUERY)
    first = app_searcher.search(QUERY, "images", k=1)[0]
    page.button(key=f"similar-images-{first.id}").click().run()
    no_traceback(page)
    name = Path(first.path).name
    assert any(f"More like **{md_escape(name)}**" == m.value for m in page.markdown)
    want = [
        h
        for h in app_searcher.search_similar("images", first.id, "images", k=PAGE)
        if h.id != first.id
    ]
    assert cards(page) == expected_cards(want)
    assert page.text_input(key="q").value == ""
    texts = app_searcher.search_similar("images", first.id, "texts", k=TEXT_PAGE)
    assert [r[1] for r in text_rows(page)] == [md_escape(h.text) for h in texts]


def test_more_results_after_similar_shows_each_image_once(page, app_searcher):
    search(page, QUERY)
    first = app_searcher.search(QUERY, "images", k=1)[0]
    page.button(key=f"similar-images-{first.id}").click().run()
    page.button(key="more-images").click().run()
    names = [name for name, _ in cards(page)]
    assert len(names) == len(set(names)) >= 2 * PAGE - 1
    assert f"**{md_escape(Path(first.path).name)}**" not in names


def test_text_hit_searches_images_with_its_vector(page, app_searcher):
    search(page, QUERY)
    top_text = app_searcher.search(QUERY, "texts", k=1)[0]
    page.button(key=f"find-texts-{top_text.id}").click().run()
    no_traceback(page)
    want = app_searcher.search_similar("texts", top_text.id, "images", k=PAGE)
    assert cards(page) == expected_cards(want)


def test_clear_returns_to_the_welcome(page):
    search(page, QUERY)
    page.button(key="clear").click().run()
    assert not page.grid
    assert any("The index holds 32 images and 32 texts" in i.value for i in page.info)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploaded_image_finds_similar_images_and_texts(page, app_searcher, app_db):
    path = app_db.parent / "images" / "red_circle_0.png"
    page.file_uploader[0].set_value(("mine.png", path.read_bytes(), "image/png")).run()
    no_traceback(page)
    assert any(
        m.value == "Images and texts like **mine\\.png** (your upload)" for m in page.markdown
    )
    assert cards(page) == expected_cards(app_searcher.search(path, "images", k=PAGE))
    texts = app_searcher.search(path, "texts", k=TEXT_PAGE)
    assert [r[1] for r in text_rows(page)] == [md_escape(h.text) for h in texts]


def test_upload_that_is_not_an_image_gets_a_message(page):
    page.file_uploader[0].set_value(("notes.png", b"these are my notes", "image/png")).run()
    no_traceback(page)
    assert [w.value for w in page.warning] == [
        "notes.png is not an image we can read (PNG, JPEG, WebP, GIF, BMP or TIFF). "
        "Pick an image file and try again."
    ]
    assert not page.grid


def test_upload_with_too_many_pixels_gets_a_message(page):
    huge = _png(Image.new("1", (9000, 5000)))  # 45 MP, but a few kB as a PNG
    page.file_uploader[0].set_value(("poster.png", huge, "image/png")).run()
    no_traceback(page)
    assert [w.value for w in page.warning] == [
        "poster.png is 9000\u00d75000 pixels (45 MP); the limit is 40 MP. Resize it and try again."
    ]


def test_upload_over_the_size_limit_gets_a_message(monkeypatch, app_db):
    at = open_page(monkeypatch, "--db", str(app_db), "--max-upload-mb", "1")
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = _png(Image.fromarray(noise))  # noise does not compress: about 1.5 MB
    assert len(data) > 2**20
    at.file_uploader[0].set_value(("big.png", data, "image/png")).run()
    no_traceback(at)
    assert len(at.warning) == 1
    assert at.warning[0].value.startswith("big.png is 1.")
    assert "the upload limit is 1 MB" in at.warning[0].value


def test_missing_database_is_explained(monkeypatch, tmp_path):
    at = open_page(monkeypatch, "--db", str(tmp_path / "nope"))
    no_traceback(at)
    assert at.error[0].value.startswith(f"There is no database at `{tmp_path / 'nope'}`")
    assert not at.text_input


def test_empty_database_is_explained(monkeypatch, tmp_path):
    at = open_page(monkeypatch, "--db", str(tmp_path))
    no_traceback(at)
    assert at.error[0].value.startswith(f"The database `{tmp_path}` is empty")


def test_folder_that_is_not_an_index_is_one_message(monkeypatch, tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"not an index")
    at = open_page(monkeypatch, "--db", str(tmp_path))
    no_traceback(at)
    assert len(at.error) == 1 and at.error[0].value.startswith(f"Opening `{tmp_path.resolve()}`")


def test_no_database_argument_says_how_to_start(monkeypatch):
    at = open_page(monkeypatch)
    no_traceback(at)
    assert "beit3 app --db DIR" in at.error[0].value


def test_database_picker_switches_between_databases(monkeypatch, app_db, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    at = open_page(monkeypatch, "--db", str(app_db), "--db", str(other))
    assert at.selectbox(key="db").options == ["db", "other"]
    search(at, QUERY)
    assert len(cards(at)) == PAGE
    at.selectbox(key="db").set_value("other").run()
    no_traceback(at)
    assert at.error[0].value.startswith(f"The database `{other}` is empty")
    assert not cards(at)


def test_sidebar_shows_model_and_index_size(page, app_searcher):
    sidebar = [m.value for m in page.sidebar.markdown]
    assert f"`{app_searcher.model_id}`" in sidebar
    assert "`images` \u00b7 32 images" in sidebar and "`texts` \u00b7 32 texts" in sidebar


def test_query_is_shown_as_text_not_markdown(page):
    search(page, "![x](http://example.com/a.png)")
    banner = page.markdown[1].value
    assert banner == "Results for **\u201c\\!\\[x\\]\\(http\\://example\\.com/a\\.png\\)\u201d**"


# --- reranking with the fusion encoder ------------------------------------------------------
# The matcher fixture is calibrated so that every pair matches with about 0.7% (conftest.py):
# the default cutoff (50%) hides every candidate, and hiding off shows them all in match order.

RERANK = 32  # the page's default number of candidates


@pytest.fixture
def matcher_page(monkeypatch: pytest.MonkeyPatch, matcher_db: Path) -> AppTest:
    at = open_page(monkeypatch, "--db", str(matcher_db))
    no_traceback(at)
    return at


def reranked_cards(hits) -> list[tuple[str, str]]:
    return [
        (
            f"**{md_escape(Path(h.path).name)}**",
            f"score {h.score:.3f} \u00b7 match {h.match:.1%} \u00b7 #{h.rank}",  # 0.x%: one decimal
        )
        for h in hits
    ]


def headings(at: AppTest) -> list[str]:
    return [m.value for m in at.main.markdown if m.value.startswith("#### ")]


def test_rerank_switches_are_on_with_a_matcher_model(matcher_page):
    rerank = matcher_page.toggle(key="rerank")
    assert rerank.value is True and not rerank.disabled
    assert matcher_page.number_input(key="rerank_k").value == RERANK
    assert matcher_page.toggle(key="hide_weak").value is True
    assert matcher_page.slider(key="min_match").value == 0.5


def test_rerank_switch_is_disabled_without_a_matcher(page, app_searcher):
    toggle = page.toggle(key="rerank-unavailable")
    assert toggle.value is False and toggle.disabled
    assert "This model has no matcher (fine-tune with `--itm`)." in [
        c.value for c in page.sidebar.caption
    ]
    assert not [t for t in page.toggle if t.key == "hide_weak"]
    search(page, QUERY)
    assert cards(page) == expected_cards(app_searcher.search(QUERY, "images", k=PAGE))


def test_reranked_cards_show_the_match_beside_the_score(matcher_page, matcher_searcher):
    matcher_page.toggle(key="hide_weak").set_value(False).run()
    search(matcher_page, QUERY)
    want = matcher_searcher.search(QUERY, "images", k=PAGE, rerank=RERANK)
    assert cards(matcher_page) == reranked_cards(want)
    assert [h.match for h in want] == sorted((h.match for h in want), reverse=True)
    assert headings(matcher_page)[0] == f"#### Images \u00b7 {PAGE}"
    captions = [c.value for c in matcher_page.main.caption]
    assert "Top 32 reranked by the fusion encoder, ordered by match." in captions
    # text -> text has no image-text pair: the texts stay in cosine order, and the page says so.
    assert "Cosine order: the fusion encoder scores image\u2013text pairs only." in captions
    texts = matcher_searcher.search(QUERY, "texts", k=TEXT_PAGE)
    assert text_rows(matcher_page) == [(f"`{h.score:.3f}`", md_escape(h.text)) for h in texts]


def test_high_cutoff_says_no_confident_match_and_offers_the_nearest(matcher_page, matcher_searcher):
    matcher_page.slider(key="min_match").set_value(0.9).run()
    search(matcher_page, QUERY)
    assert [w.value for w in matcher_page.warning] == [
        "No confident match for \u201ca red circle\u201d (none of the top 32 reaches 90%)."
    ]
    assert headings(matcher_page)[0] == f"#### Not confident \u00b7 {PAGE}"
    # The nearest are the same reranked candidates, each with its (low) match shown.
    assert matcher_searcher.search(QUERY, "images", k=PAGE, rerank=RERANK, min_match=0.9) == []
    want = matcher_searcher.search(QUERY, "images", k=PAGE, rerank=RERANK)
    assert cards(matcher_page) == reranked_cards(want)
    assert all(h.match < 0.9 for h in want)


def test_low_cutoff_keeps_the_candidates_as_results(matcher_page, matcher_searcher):
    matcher_page.slider(key="min_match").set_value(0.0).run()
    search(matcher_page, QUERY)
    assert not matcher_page.warning
    assert headings(matcher_page)[0] == f"#### Images \u00b7 {PAGE}"
    want = matcher_searcher.search(QUERY, "images", k=PAGE, rerank=RERANK, min_match=0.0)
    assert cards(matcher_page) == reranked_cards(want)


def test_reranked_pages_end_with_the_candidates(matcher_page, matcher_searcher):
    matcher_page.toggle(key="hide_weak").set_value(False).run()
    matcher_page.number_input(key="rerank_k").set_value(12).run()
    search(matcher_page, QUERY)
    assert cards(matcher_page) == reranked_cards(
        matcher_searcher.search(QUERY, "images", k=PAGE, rerank=12)
    )
    matcher_page.button(key="more-images").click().run()
    want = matcher_searcher.search(QUERY, "images", k=PAGE, rerank=12) + matcher_searcher.search(
        QUERY, "images", k=PAGE, offset=PAGE, rerank=12
    )
    assert len(want) == 12 and cards(matcher_page) == reranked_cards(want)
    assert not [b for b in matcher_page.button if b.key == "more-images"]


def test_uploaded_image_reranks_the_texts_not_the_images(
    matcher_page, matcher_searcher, matcher_db
):
    path = matcher_db.parent / "images" / "red_circle_0.png"
    matcher_page.toggle(key="hide_weak").set_value(False).run()
    matcher_page.file_uploader[0].set_value(("mine.png", path.read_bytes(), "image/png")).run()
    no_traceback(matcher_page)
    texts = matcher_searcher.search(path, "texts", k=TEXT_PAGE, rerank=RERANK)
    assert text_rows(matcher_page) == [
        (f"`{h.score:.3f} \u00b7 {h.match:.1%}`", md_escape(h.text)) for h in texts
    ]
    assert cards(matcher_page) == expected_cards(matcher_searcher.search(path, "images", k=PAGE))
    captions = [c.value for c in matcher_page.main.caption]
    assert "Cosine order: the fusion encoder scores image\u2013text pairs only." in captions


def test_rerank_off_gives_cosine_order(matcher_page, matcher_searcher):
    matcher_page.toggle(key="rerank").set_value(False).run()
    assert matcher_page.toggle(key="hide_weak").disabled
    search(matcher_page, QUERY)
    assert cards(matcher_page) == expected_cards(matcher_searcher.search(QUERY, "images", k=PAGE))


# --- helpers without a page ---------------------------------------------------------------


def test_decode_upload_accepts_an_image_and_refuses_empty_bytes():
    image = decode_upload(_png(Image.new("RGBA", (20, 10), (255, 0, 0, 0))), "a.png", max_mb=1)
    assert image.mode == "RGB" and image.size == (20, 10)
    with pytest.raises(ValueError, match="empty file"):
        decode_upload(b"", "e.png", max_mb=1)


def test_examples_from_names_and_texts():
    assert examples_from_names(
        ["/x/red_circle_0.png", "/x/IMG_0042.jpg", "/y/red_circle_1.png", None, "/x/Blue-Sky.webp"]
    ) == ["red circle", "blue sky"]
    assert examples_from_texts(
        ["a dog", "A dog", "x", "a very long caption " * 5, "a cat"], limit=3
    ) == ["a dog", "a cat"]


def test_arrange_reranked_cuts_as_the_searchers_min_match(matcher_searcher):
    ranked = matcher_searcher.search(QUERY, "images", k=RERANK, rerank=RERANK)
    cutoff = ranked[9].match  # the 10th best: about 10 pass (ties at the cutoff pass too)
    arranged = arrange_reranked(ranked, cutoff, shown=RERANK)
    passed = matcher_searcher.search(QUERY, "images", k=RERANK, rerank=RERANK, min_match=cutoff)
    assert arranged.hits == passed and len(passed) >= 10
    assert arranged.confident and arranged.hidden == RERANK - len(passed)
    assert [h.rank for h in arrange_reranked(ranked, cutoff, shown=4).hits] == [1, 2, 3, 4]
    nothing = arrange_reranked(ranked, 1.0, shown=PAGE)
    assert not nothing.confident and nothing.more and nothing.hits == ranked[:PAGE]
    assert arrange_reranked([], 0.5, shown=PAGE).confident  # no candidate: "no images match"


def test_format_match_keeps_a_decimal_near_certainty():
    got = [format_match(p) for p in (0.87, 0.5, 0.0067, 0.0004, 0.995, 0.9996)]
    assert got == ["87%", "50%", "0.7%", "<0.1%", "99.5%", ">99.9%"]


def test_parse_app_args_reports_unknown_arguments():
    args = parse_app_args(["--db", "a", "--db", "b", "--colour", "red"])
    assert [str(d) for d in args.dbs] == ["a", "b"]
    assert args.errors == ("unknown app argument '--colour'", "unknown app argument 'red'")


# --- the `beit3 app` command --------------------------------------------------------------


def test_app_command_serves_the_packaged_page_headless(monkeypatch, app_db, tiny_checkpoint):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    result = CliRunner().invoke(
        cli,
        [
            "app",
            "--db",
            str(app_db),
            "--port",
            "8765",
            "--model",
            str(tiny_checkpoint),
            "--max-upload-mb",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "streamlit", "run", str(APP_FILE)]
    flags = dict(zip(cmd[5 : cmd.index("--") : 2], cmd[6 : cmd.index("--") : 2], strict=True))
    assert flags["--server.headless"] == "true"
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8765"
    assert flags["--server.maxUploadSize"] == "5"
    assert flags["--browser.gatherUsageStats"] == "false"
    assert cmd[cmd.index("--") + 1 :] == [
        "--db",
        str(app_db),
        "--model",
        str(tiny_checkpoint),
        "--max-upload-mb",
        "5",
    ]
    assert "http://127.0.0.1:8765" in result.output


def test_app_command_rejects_a_missing_database(tmp_path):
    result = CliRunner().invoke(cli, ["app", "--db", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


# --- steering: compositional terms, feedback, mode, filters, collapse (issue 13) ----------------


def steered_cards(hits) -> list[tuple[str, str]]:
    from app._ui import hit_caption

    return [(f"**{md_escape(Path(h.path).name)}**", hit_caption(h)) for h in hits]


def test_typed_compositional_query_is_the_librarys(page, app_searcher):
    from indexer import parse_query, run_query

    text = "2:a red circle - blue"
    search(page, text)
    want = run_query(app_searcher, parse_query(text), "images", k=PAGE)
    assert cards(page) == steered_cards(want)


def test_typed_path_is_refused_in_the_page(page):
    search(page, "a red circle + ./secret.png")
    assert any("names a file" in e.value and "character 16" in e.value for e in page.error)


def test_add_to_query_and_minus_toggle(page, app_searcher):
    from indexer import CompositeQuery, Term, run_query

    search(page, QUERY)
    first = app_searcher.search(QUERY, "images", k=1)[0]
    page.button(key=f"add-images-{first.id}").click().run()
    no_traceback(page)
    chip = page.button(key="chip-0")
    assert chip.label == f"+ {Path(first.path).name}"
    plus = CompositeQuery((Term.text(QUERY), Term.item(first.id, table="images")))
    assert cards(page) == steered_cards(run_query(app_searcher, plus, "images", k=PAGE))
    page.button(key="chip-0").click().run()  # the minus toggle
    assert page.button(key="chip-0").label == f"\u2212 {Path(first.path).name}"
    minus = CompositeQuery((Term.text(QUERY), Term.item(first.id, -1.0, table="images")))
    shown = cards(page)
    assert shown == steered_cards(run_query(app_searcher, minus, "images", k=PAGE))
    assert f"**{md_escape(Path(first.path).name)}**" not in [c[0] for c in shown]
    page.button(key="chip-remove-0").click().run()
    assert cards(page) == expected_cards(app_searcher.search(QUERY, "images", k=PAGE))


def test_typed_words_join_the_query_as_a_chip(page, app_searcher):
    from indexer import CompositeQuery, run_query

    search(page, QUERY)
    page.text_input(key="q").input("green").run()
    page.button(key="add-text").click().run()
    assert page.button(key="chip-0").label == "+ green"
    want = run_query(app_searcher, CompositeQuery.of(QUERY, "green"), "images", k=PAGE)
    assert cards(page) == steered_cards(want)


def test_an_upload_joins_the_query_as_a_chip_and_stays_for_new_words(page, app_searcher, app_db):
    from indexer import CompositeQuery, Term, run_query

    path = app_db.parent / "images" / "blue_square_0.png"
    page.file_uploader[0].set_value(("mine.png", path.read_bytes(), "image/png")).run()
    page.button(key="add-upload").click().run()
    assert page.button(key="chip-0").label == "+ mine.png"
    search(page, QUERY)  # new words: the upload stays as a term
    image = decode_upload(path.read_bytes(), "mine.png", max_mb=1)
    both = CompositeQuery((Term.text(QUERY), Term.image(image)))
    assert cards(page) == steered_cards(run_query(app_searcher, both, "images", k=PAGE))
    page.button(key="chip-0").click().run()  # minus the upload
    minus = CompositeQuery((Term.text(QUERY), Term.image(image, -1.0)))
    assert cards(page) == steered_cards(run_query(app_searcher, minus, "images", k=PAGE))


def test_less_like_this_drops_the_hit_and_requeries(page, app_searcher):
    from indexer import CompositeQuery, run_query

    search(page, QUERY)
    first = app_searcher.search(QUERY, "images", k=1)[0]
    page.button(key=f"dislike-images-{first.id}").click().run()
    no_traceback(page)
    want = run_query(
        app_searcher, CompositeQuery.of(QUERY), "images", k=PAGE, non_relevant=[first.id]
    )
    shown = cards(page)
    assert shown == steered_cards(want)
    assert f"**{md_escape(Path(first.path).name)}**" not in [c[0] for c in shown]


def test_more_like_this_moves_the_hit_up(page, app_searcher):
    from indexer import CompositeQuery, run_query

    search(page, QUERY)
    tenth = app_searcher.search(QUERY, "images", k=PAGE)[-1]
    page.button(key=f"like-images-{tenth.id}").click().run()
    want = run_query(app_searcher, CompositeQuery.of(QUERY), "images", k=PAGE, relevant=[tenth.id])
    shown = cards(page)
    assert shown == steered_cards(want)
    names = [c[0] for c in shown]
    assert names.index(f"**{md_escape(Path(tenth.path).name)}**") < PAGE - 1
    page.button(key="reset-feedback").click().run()
    assert cards(page) == expected_cards(app_searcher.search(QUERY, "images", k=PAGE))


def test_collapse_shows_similar_counts(page, app_searcher):
    from indexer import CompositeQuery, run_query

    page.toggle(key="collapse").set_value(True).run()
    page.slider(key="collapse_threshold").set_value(0.9).run()
    search(page, QUERY)
    want = run_query(app_searcher, CompositeQuery.of(QUERY), "images", k=PAGE, collapse=0.9)
    assert cards(page) == steered_cards(want)


def test_type_filter_and_hybrid_mode(page, app_searcher):
    from indexer import CompositeQuery, Filters, run_query

    page.multiselect(key="f_types").set_value(["jpg"]).run()
    search(page, QUERY)
    assert any("No images match" in i.value for i in page.info)  # the index holds PNGs only
    page.multiselect(key="f_types").set_value(["png"]).run()
    page.button_group[0].set_value("hybrid").run()
    no_traceback(page)
    want = run_query(
        app_searcher,
        CompositeQuery.of(QUERY),
        "images",
        k=PAGE,
        mode="hybrid",
        filters=Filters(types=("png",)),
    )
    assert cards(page) == steered_cards(want)
    assert len(page.get("download_button")) == 4  # JSON and CSV of images and of texts


def test_download_exports_every_page_with_the_cli_exporter(monkeypatch, app_searcher):
    import importlib

    from app._ui import EXPORT_LIMIT, Steering
    from app.export import format_hits
    from indexer import CompositeQuery, run_query

    monkeypatch.setattr(sys, "argv", ["streamlit_app.py"])  # bare import: the page says no db
    module = importlib.import_module("app.streamlit_app")
    query = module.Query("text", ("text", QUERY), QUERY, text=QUERY)
    steer = Steering(mode="hybrid", collapse=0.9)
    got = module.export_data(app_searcher, query, "images", steer, "csv")()
    want = run_query(
        app_searcher,
        CompositeQuery.of(QUERY),
        "images",
        k=EXPORT_LIMIT,
        mode="hybrid",
        collapse=0.9,
    )
    assert got == format_hits(want, "csv")
    assert len(got.splitlines()) == 1 + len(want) and 0 < len(want) <= 32
    plain = module.export_data(app_searcher, query, "texts", Steering(), "json")()
    assert plain == format_hits(app_searcher.search(QUERY, "texts", k=EXPORT_LIMIT), "json")
