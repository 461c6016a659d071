"""The feedback store: labels on real search hits, replace, survive reopening, export as pairs."""

from __future__ import annotations

import json
import os
import sqlite3
import threading

import pytest

from beit3.data import read_pairs
from beit3.errors import InputDataError
from indexer import Searcher, index_images
from indexer.feedback import FEEDBACK_NAME, FeedbackStore


@pytest.fixture
def db_hits(tmp_path, shapes_dir, tiny_checkpoint):
    db = tmp_path / "db"
    index_images([shapes_dir], db, model=tiny_checkpoint, table="images", device="cpu")
    searcher = Searcher(db, device="cpu")
    hits = searcher.search("a red circle", table="images", k=6)
    return db, searcher, hits


def _label(store, hit, label, model_id, query="a red circle"):
    return store.add(
        query_text=query,
        hit_table=hit.table,
        hit_id=hit.id,
        hit_path=hit.path,
        label=label,
        model_id=model_id,
        version="v1",
    )


def test_labels_replace_survive_reopen_and_export_pairs_with_negatives(db_hits, tmp_path):
    db, searcher, hits = db_hits
    store = FeedbackStore(db)
    assert (db / FEEDBACK_NAME).is_file()
    model_id = searcher.model_id
    _label(store, hits[3], -1, model_id)
    _label(store, hits[3], 1, model_id)  # changed their mind: replaces, not a second row
    _label(store, hits[0], -1, model_id)
    _label(store, hits[1], -1, model_id)
    _label(store, hits[2], 1, model_id, query="  a   blue square ")  # whitespace normalised
    assert store.count() == 4

    again = FeedbackStore(db)  # a new process / app restart
    rows = again.labels(hit_table="images", query_text="a red circle")
    assert [(r.hit_id, r.label) for r in rows] == [
        (hits[3].id, 1),
        (hits[0].id, -1),
        (hits[1].id, -1),
    ]
    assert {r.model_id for r in rows} == {model_id} and rows[0].version == "v1"
    assert again.labels(query_text="a blue square")[0].hit_path == hits[2].path

    summary = again.export(tmp_path / "fb" / "feedback.jsonl")
    assert (summary.rows, summary.negatives, summary.queries, summary.skipped) == (2, 2, 2, {})
    lines = [json.loads(x) for x in summary.path.read_text().splitlines()]
    red = next(line for line in lines if line["text"] == "a red circle")
    assert red["image"] == hits[3].path
    assert sorted(red["negatives"]) == sorted([hits[0].path, hits[1].path])
    # The export is a training manifest that the one pair reader accepts.
    pairs = read_pairs(summary.path)
    assert {(p.image, p.text) for p in pairs} == {
        (hits[3].path, "a red circle"),
        (hits[2].path, "a blue square"),
    }


def test_export_skips_negatives_without_a_positive_and_missing_images(db_hits, tmp_path):
    db, searcher, hits = db_hits
    store = FeedbackStore(db)
    _label(store, hits[0], -1, searcher.model_id, query="only wrong hits")
    _label(store, hits[1], 1, searcher.model_id, query="moved away")
    store.add(
        query_id=hits[2].id,
        query_table="images",
        hit_table="images",
        hit_id=hits[4].id,
        hit_path=hits[4].path,
        label=1,
        model_id=searcher.model_id,
    )
    os.remove(hits[1].path)
    summary = store.export(tmp_path / "out.jsonl")
    assert summary.rows == 0
    assert summary.skipped == {
        "not-relevant labels of a query with no relevant hit": 1,
        "labels whose image is missing": 1,
        "labels of an image-to-image or text-to-text query": 1,
    }
    assert "skipped" in summary.line() and summary.path.read_text() == ""


def test_bad_labels_are_refused_with_the_field(db_hits):
    db, searcher, hits = db_hits
    store = FeedbackStore(db)
    with pytest.raises(InputDataError, match="label must be 1 .* got 0"):
        _label(store, hits[0], 0, searcher.model_id)
    with pytest.raises(InputDataError, match="either query_text, or query_id"):
        store.add(hit_table="images", hit_id=hits[0].id, label=1, model_id="m")
    with pytest.raises(InputDataError, match="query_id with its query_table"):
        store.add(query_id="abc", hit_table="images", hit_id=hits[0].id, label=1, model_id="m")
    with pytest.raises(InputDataError, match="no such database directory"):
        FeedbackStore(db / "nope")
    assert store.count() == 0


def test_remove_and_clear_by_table(db_hits):
    db, searcher, hits = db_hits
    store = FeedbackStore(db)
    for hit in hits[:3]:
        _label(store, hit, 1, searcher.model_id)
    store.add(
        query_text="x",
        hit_table="texts",
        hit_id="t" * 64,
        hit_text="a red circle",
        label=-1,
        model_id="m",
    )
    assert store.remove(query_text="a red circle", hit_table="images", hit_id=hits[0].id)
    assert not store.remove(query_text="a red circle", hit_table="images", hit_id=hits[0].id)
    assert (store.count(), store.count("images")) == (3, 2)
    assert store.clear("images") == 2
    assert [r.hit_table for r in store.labels()] == ["texts"]


def test_concurrent_writers_lose_no_label(db_hits):
    db, searcher, hits = db_hits

    def write(offset: int) -> None:
        store = FeedbackStore(db)
        for i in range(25):
            store.add(
                query_text=f"query {offset + i}",
                hit_table="images",
                hit_id=hits[0].id,
                hit_path=hits[0].path,
                label=1,
                model_id=searcher.model_id,
            )

    threads = [threading.Thread(target=write, args=(n * 100,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert FeedbackStore(db).count() == 100
    mode = sqlite3.connect(db / FEEDBACK_NAME).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
