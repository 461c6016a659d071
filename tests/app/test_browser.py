"""End to end: `beit3 app` on 127.0.0.1, driven by Debian's Chromium through Playwright.

Set ``BEIT3_SCREENSHOTS=DIR`` to keep the screenshots (search.png, similar.png, rerank.png,
steer.png) in
DIR; they are always written under the test's tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest

from app.screenshot import (
    GALLERY,
    browser_page,
    chromium_path,
    click_similar,
    open_app,
    search_reranked,
    search_text,
    serve,
    steer,
)

pytestmark = pytest.mark.slow

QUERY = "a red circle"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip(
            "chromium is not installed: `apt-get install -y chromium` or `make system-deps`"
        )
    pytest.importorskip(
        "playwright.sync_api", reason="playwright is a test extra: pip install -e '.[test]'"
    )
    return path


def _cards(hits) -> list[tuple[str, str]]:
    return [(Path(h.path).name, f"score {h.score:.3f} \u00b7 #{h.rank}") for h in hits]


def test_query_in_chromium_shows_result_images(chromium, app_db, app_searcher, tmp_path):
    shots = Path(os.environ.get("BEIT3_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "server.log"
    with serve([app_db], log=log) as url, browser_page() as page:
        open_app(page, url)  # loads twice: the first, cold load is not what is measured

        got = search_text(page, QUERY)
        assert got == _cards(app_searcher.search(QUERY, "images", k=10))
        images = page.locator(f"{GALLERY} img").evaluate_all(
            "els => els.map(e => [e.currentSrc, e.naturalWidth])"
        )
        assert len(images) == 10 and all(width > 0 for _, width in images)
        # Thumbnails come from Streamlit's media store, never from a file path of the index.
        assert {urlparse(src).path.split("/")[1] for src, _ in images} == {"media"}
        assert not any(str(app_db.parent) in src for src, _ in images)
        page.screenshot(path=str(shots / "search.png"))

        first = app_searcher.search(QUERY, "images", k=1)[0]
        similar = click_similar(page, 0)
        want = [
            h
            for h in app_searcher.search_similar("images", first.id, "images", k=10)
            if h.id != first.id
        ]
        assert similar == _cards(want)
        page.screenshot(path=str(shots / "similar.png"))
    assert "Traceback" not in log.read_text()


def test_reranked_query_in_chromium_shows_match_percentages(
    chromium, matcher_db, matcher_searcher, tmp_path
):
    # The matcher fixture gives every pair about 0.7% (conftest.py): nothing reaches the
    # default cutoff, so the page says so and shows the nearest candidates with their match.
    shots = Path(os.environ.get("BEIT3_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "server.log"
    with serve([matcher_db], log=log) as url, browser_page() as page:
        open_app(page, url)
        got = search_reranked(page, QUERY)
        want = matcher_searcher.search(QUERY, "images", k=10, rerank=32)
        assert got == [
            (Path(h.path).name, f"score {h.score:.3f} \u00b7 match {h.match:.1%} \u00b7 #{h.rank}")
            for h in want
        ]
        alert = page.locator("[data-testid=stAlert]", has_text="No confident match")
        message = alert.locator("[data-testid=stMarkdownContainer]")  # without the icon's name
        assert message.inner_text().strip() == (
            "No confident match for \u201ca red circle\u201d (none of the top 32 reaches 50%)."
        )
        assert page.locator("h4", has_text="Not confident").count() == 1
        page.screenshot(path=str(shots / "rerank.png"))
    assert "Traceback" not in log.read_text()


def test_steered_query_in_chromium(chromium, app_db, app_searcher, tmp_path):
    # Hybrid mode, a filter and a compositional query typed in the box, then the second hit
    # added to the query as a chip: the page shows what run_query returns for the same terms.
    from indexer import CompositeQuery, Filters, Term, parse_query, run_query

    shots = Path(os.environ.get("BEIT3_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    # "2:red": a colon before a colour name starts Streamlit's colour syntax unless escaped
    text = "2:red circle - blue"
    options = {"mode": "hybrid", "filters": Filters(min_width=1)}
    before = run_query(app_searcher, parse_query(text), "images", k=10, **options)
    log = tmp_path / "server.log"
    with serve([app_db], log=log) as url, browser_page() as page:
        open_app(page, url)
        got = steer(page, text)
        added = CompositeQuery((*parse_query(text).terms, Term.item(before[1].id, table="images")))
        want = run_query(app_searcher, added, "images", k=10, **options)
        assert got == _cards(want)
        chip = page.locator(".st-key-chip-0 button").first.inner_text()
        assert chip.strip() == f"+ {Path(before[1].path).name}"
        page.screenshot(path=str(shots / "steer.png"))
    assert "Traceback" not in log.read_text()
