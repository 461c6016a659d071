"""The page's thumbs up / down store relevance labels (issue 15), driven by AppTest on a copy of
the real tiny app index; what is stored is compared with the Searcher's hits."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.cli_app import APP_FILE
from indexer import Searcher
from indexer.feedback import FeedbackStore

QUERY = "a red circle"


@pytest.fixture
def db(tmp_path: Path, app_db: Path) -> Path:
    # The same depth as app_db: a database records its checkpoint relative to itself.
    copy = tmp_path / "db"
    shutil.copytree(app_db, copy)
    return copy


def _open(monkeypatch: pytest.MonkeyPatch, db: Path) -> AppTest:
    monkeypatch.setattr(sys, "argv", [str(APP_FILE), "--db", str(db)])
    at = AppTest.from_file(str(APP_FILE), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _search(at: AppTest, text: str) -> None:
    at.text_input(key="q").input(text).run()
    assert not at.exception, [e.value for e in at.exception]


def _count_caption(at: AppTest) -> str:
    return next(c.value for c in at.sidebar.caption if "feedback label" in c.value)


def test_thumbs_store_labels_for_the_typed_query_and_survive_a_restart(monkeypatch, db):
    searcher = Searcher(db)
    info = searcher.tables["images"]
    hits = searcher.search(QUERY, "images", k=10)
    at = _open(monkeypatch, db)
    assert _count_caption(at).startswith("0 feedback labels stored for `images`")
    _search(at, QUERY)
    at.button(key=f"like-images-{hits[3].id}").click().run()
    at.button(key=f"dislike-images-{hits[0].id}").click().run()
    labels = FeedbackStore(db).labels()
    assert [(r.query_text, r.hit_id, r.hit_path, r.label) for r in labels] == [
        (QUERY, hits[3].id, hits[3].path, 1),
        (QUERY, hits[0].id, hits[0].path, -1),
    ]
    assert {(r.model_id, r.version) for r in labels} == {(info.model_id, info.version)}
    # Changing one's mind replaces the label (steering is re-queried too: find the hit again).
    at.button(key=f"dislike-images-{hits[3].id}").click().run()
    assert [(r.hit_id, r.label) for r in FeedbackStore(db).labels()] == [
        (hits[0].id, -1),
        (hits[3].id, -1),  # the newest label now
    ]
    assert _count_caption(at).startswith("2 feedback labels stored")
    again = _open(monkeypatch, db)  # a restarted app reads them back
    assert _count_caption(again).startswith("2 feedback labels stored")


def test_an_item_query_stores_the_item_and_a_text_hit(monkeypatch, db):
    searcher = Searcher(db)
    item = searcher.search(QUERY, "images", k=1)[0]
    texts = searcher.search_similar("images", item.id, "texts", k=6)
    at = _open(monkeypatch, db)
    _search(at, QUERY)
    at.button(key=f"similar-images-{item.id}").click().run()
    at.button(key=f"like-texts-{texts[1].id}").click().run()
    [label] = FeedbackStore(db).labels()
    assert (label.query_id, label.query_table, label.query_path) == (item.id, "images", item.path)
    assert (label.hit_table, label.hit_text, label.label) == ("texts", texts[1].text, 1)
    # Exported, it is a training pair: the clicked image and the text marked relevant.
    summary = FeedbackStore(db).export(db.parent / "fb.jsonl")
    assert summary.rows == 1 and texts[1].text in summary.path.read_text()


def test_an_upload_steers_but_stores_nothing(monkeypatch, db):
    at = _open(monkeypatch, db)
    data = io.BytesIO()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(data, format="PNG")
    at.file_uploader[0].set_value(("red.png", data.getvalue(), "image/png")).run()
    first = Searcher(db).search(Image.open(data), "images", k=1)[0]
    at.button(key=f"like-images-{first.id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["liked"] == (first.id,)  # it steers
    assert FeedbackStore(db).count() == 0


def test_sidebar_shows_each_tables_active_version_and_model(monkeypatch, db):
    at = _open(monkeypatch, db)
    tables = Searcher(db).tables
    captions = [c.value for c in at.sidebar.caption]
    for info in tables.values():
        assert f"version {info.version} \u00b7 `{info.model_id}`" in captions
