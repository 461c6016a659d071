"""Drive the running app in a real browser: the end-to-end test and the README screenshots.

Starts ``beit3 app`` on 127.0.0.1 and opens it in Debian's Chromium through Playwright (no browser
download: ``executable_path`` is the system ``chromium``)::

    python -m app.screenshot --db DIR --query "a red circle" --out docs/screenshots

writes ``search.png`` (a text query) and ``similar.png`` (after clicking "Similar" on the first
hit). ``--shots rerank`` writes ``rerank.png`` instead: the same query reranked by the fusion
encoder, cards showing the match beside the score (the index's model must have a matcher).
``--shots steer`` writes ``steer.png``: hybrid mode, a minimum-width filter, the query typed in the
query syntax (compositional) and the second hit added to it as a chip.
``--index-demo-with CKPT`` first indexes the bundled emoji set with CKPT into a temporary folder,
as ``beit3 demo`` does with the bundled model, and uses that as the database::

    python -m app.screenshot --index-demo-with .cache/demo-itm/model --shots rerank \\
        --query "a red heart" --out docs/screenshots

``tests/app/test_browser.py`` uses the same functions, so the pictures show what the test saw.
Playwright is a test dependency and is imported only here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Measured on Debian 12's chromium as root in a container (../shared/reference/environment.md).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 1000}
QUERY_INPUT = ".st-key-q input"
GALLERY = ".st-key-image-grid"
SHOTS = ("search", "similar", "rerank", "steer")
SIMILAR_BUTTON = '[class*="st-key-similar-"] button'  # one per card; cards have more buttons
NO_MATCHER = "This model has no matcher"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(
    dbs: list[Path],
    *,
    model: Path | None = None,
    port: int | None = None,
    timeout: float = 90.0,
    log: Path | None = None,
) -> Iterator[str]:
    """Run ``beit3 app`` in the background until the block ends; yields the page URL.

    Raises:
        RuntimeError: the server exited or did not answer ``/_stcore/health`` within ``timeout``.
    """
    port = port or free_port()
    command = [sys.executable, "-m", "app.cli", "app", "--port", str(port)]
    command += [arg for db in dbs for arg in ("--db", str(db))]
    if model is not None:
        command += ["--model", str(model)]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    # A session of its own, so stopping it also stops the streamlit child of `beit3 app`.
    proc = subprocess.Popen(
        command,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"`{' '.join(command)}` exited with {proc.returncode}"
                    + (f"; see {log}" if log else "")
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply,
            ):
                if reply.read().strip() == b"ok":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(viewport: dict[str, int] | None = None) -> Iterator[Any]:
    """A Playwright page in headless system Chromium."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError(
            "chromium is not installed: `apt-get install -y chromium` (or `make system-deps`)"
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=viewport or VIEWPORT, device_scale_factor=1)
            yield page
        finally:
            browser.close()


def open_app(page: Any, url: str, timeout_s: float = 90.0) -> None:
    """Load the page and wait until it is ready to take a query.

    The first load after a server start is cold (the model and index load then): it is done
    once here, then the page is loaded again so what follows sees a warm app.
    """
    for _ in range(2):
        page.goto(url, wait_until="domcontentloaded")
        page.locator(QUERY_INPUT).wait_for(state="visible", timeout=timeout_s * 1000)
    _wait_idle(page, timeout_s)


def _wait_idle(page: Any, timeout_s: float = 30.0) -> None:
    """Wait until the script run has finished and every card and image is complete."""
    page.wait_for_function(
        """(gallery) => {
            const status = document.querySelector('[data-testid="stStatusWidget"]');
            if (status && /running/i.test(status.innerText || '')) return false;
            const imgs = Array.from(document.querySelectorAll('img'));
            if (!imgs.every(i => i.complete && i.naturalWidth > 0)) return false;
            const grid = document.querySelector(gallery);
            if (!grid) return true;
            const n = (sel) => grid.querySelectorAll(sel).length;
            const cards = n('[data-testid=stCaptionContainer]');
            return cards > 0 && n('[data-testid=stMarkdownContainer] strong') === cards
                && n('[class*="st-key-similar-"] [data-testid=stButton]') === cards;
        }""",
        arg=GALLERY,
        timeout=timeout_s * 1000,
    )
    page.wait_for_timeout(300)  # let the last delta of the run paint


def search_text(page: Any, text: str, timeout_s: float = 30.0) -> list[tuple[str, str]]:
    """Type ``text``, press Enter, wait for the gallery; returns its (name, caption) cards."""
    box = page.locator(QUERY_INPUT)
    box.fill(text)
    box.press("Enter")
    page.get_by_text(f"Results for \u201c{text}\u201d").wait_for(timeout=timeout_s * 1000)
    page.locator(f"{GALLERY} img").first.wait_for(timeout=timeout_s * 1000)
    _wait_idle(page, timeout_s)
    return gallery(page)


def click_similar(page: Any, index: int = 0, timeout_s: float = 30.0) -> list[tuple[str, str]]:
    """Click "Similar" on the ``index``-th card; returns the new gallery."""
    name = gallery(page)[index][0]
    page.locator(f"{GALLERY} {SIMILAR_BUTTON}").nth(index).click()
    page.get_by_text(f"More like {name}").wait_for(timeout=timeout_s * 1000)
    page.mouse.move(
        VIEWPORT["width"] // 2, 4
    )  # no hover tooltip left over the button in a screenshot
    _wait_idle(page, timeout_s)
    return gallery(page)


def steer(
    page: Any, text: str, mode: str = "hybrid", min_width: int = 1, timeout_s: float = 60.0
) -> list[tuple[str, str]]:
    """Pick ``mode`` and a minimum-width filter in the sidebar, search ``text`` (the query
    syntax), then add the second hit to the query ("+" on its card); returns the cards."""
    page.locator(".st-key-mode button", has_text=mode).click()
    _wait_idle(page, timeout_s)
    page.get_by_text("Filters (images)").click()
    width = page.locator(".st-key-f_min_width input")
    width.fill(str(min_width))
    width.press("Enter")
    _wait_idle(page, timeout_s)
    search_text(page, text, timeout_s)
    # The icon-only button reports no box of its own to Playwright: click its container.
    page.locator(f'{GALLERY} [class*="st-key-add-"]').nth(1).click()
    page.locator(".st-key-chip-0").wait_for(timeout=timeout_s * 1000)
    page.mouse.move(VIEWPORT["width"] // 2, 4)
    _wait_idle(page, timeout_s)
    return gallery(page)


def gallery(page: Any) -> list[tuple[str, str]]:
    """The image cards on screen, in order: (file name, "score 0.123 · #1")."""
    names = page.locator(f"{GALLERY} [data-testid=stMarkdownContainer] strong").all_inner_texts()
    captions = page.locator(f"{GALLERY} [data-testid=stCaptionContainer]").all_inner_texts()
    return list(zip(names, captions, strict=True))


def search_reranked(page: Any, text: str, timeout_s: float = 60.0) -> list[tuple[str, str]]:
    """:func:`search_text` with reranking on (the page's default with a matcher); returns the
    cards, each caption with its match ("score 0.312 · match 87% · #1").

    Raises:
        RuntimeError: the index's model has no matcher, or the cards show no match.
    """
    if page.get_by_text(NO_MATCHER).count():
        raise RuntimeError(
            "the index's model has no matcher, so the page cannot rerank: index with a model "
            "fine-tuned with --itm (or pass one with --index-demo-with)"
        )
    cards = search_text(page, text, timeout_s)
    if not cards or not all(" \u00b7 match " in caption for _, caption in cards):
        raise RuntimeError(f"the cards for {text!r} show no match percentage: {cards[:3]}")
    return cards


def take_screenshots(
    dbs: list[Path],
    out_dir: Path,
    query: str,
    *,
    model: Path | None = None,
    shots: tuple[str, ...] = ("search", "similar"),
) -> list[Path]:
    """Serve ``dbs``, run ``query`` in the browser, and save ``<shot>.png`` for each of
    ``shots``: search (the query), similar ("Similar" on its first hit), rerank (the query
    reranked, for a model with a matcher)."""
    unknown = sorted(set(shots) - set(SHOTS))
    if unknown:
        raise ValueError(f"unknown screenshots {unknown}; choose from {', '.join(SHOTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with serve(dbs, model=model) as url, browser_page() as page:
        open_app(page, url)
        if "rerank" in shots:
            search_reranked(page, query)
            written.append(out_dir / "rerank.png")
            page.screenshot(path=str(written[-1]))
        if "steer" in shots:
            steer(page, query)
            written.append(out_dir / "steer.png")
            page.screenshot(path=str(written[-1]))
            open_app(page, url)  # a fresh session for the other shots
        if "search" in shots or "similar" in shots:
            search_text(page, query)  # the page has reranking on when the model can
            if "search" in shots:
                written.append(out_dir / "search.png")
                page.screenshot(path=str(written[-1]))
            if "similar" in shots:
                click_similar(page, 0)
                written.append(out_dir / "similar.png")
                page.screenshot(path=str(written[-1]))
    return written


def index_demo_with(model: Path, db: Path) -> Path:
    """Index the bundled emoji images (labelled with their names) and the names as a text table
    with ``model``, as ``beit3 demo`` does with the bundled model; returns ``db``."""
    from app.demo import build_demo_index

    return build_demo_index(db, model=model)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", type=Path, action="append")
    source.add_argument(
        "--index-demo-with",
        type=Path,
        metavar="CKPT",
        help="index the bundled emoji set with this checkpoint (in a temporary folder) and use it",
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--query", required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument(
        "--shots",
        default="search,similar",
        help=f"comma-separated, from {', '.join(SHOTS)} (default: search,similar)",
    )
    ns = parser.parse_args(argv)
    shots = tuple(s.strip() for s in ns.shots.split(",") if s.strip())
    with tempfile.TemporaryDirectory(prefix="beit3-screenshot-") as scratch:
        dbs = ns.db or [index_demo_with(ns.index_demo_with, Path(scratch) / "demo")]
        for path in take_screenshots(dbs, ns.out, ns.query, model=ns.model, shots=shots):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
