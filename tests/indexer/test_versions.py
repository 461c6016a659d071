"""Model versions of a table, readers pinned to the last finished commit, the writer lock, and
databases written before versions existed (format 1)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

import indexer.build
from beit3 import IndexMismatchError, InputDataError, load_checkpoint
from indexer import (
    CompositeQuery,
    Searcher,
    activate_version,
    index_images,
    list_versions,
    remove_version,
    run_query,
    version_paths,
)
from indexer.manifest import DbManifest, write_lock
from tests.indexer.helpers import rows


def _ids(hits) -> list[str]:
    return [h.id for h in hits]


def test_a_new_model_builds_a_version_beside_the_active_one(
    tmp_path, shapes_dir, tiny_checkpoint, other_checkpoint, monkeypatch
):
    db = tmp_path / "db"
    first = index_images([shapes_dir], db, tiny_checkpoint, num_workers=0)
    assert (first.version, first.activated) == ("v1", True)
    searcher = Searcher(db)
    before = _ids(searcher.search("a red circle", "images", k=5))

    hashed: list[str] = []
    real_hash = indexer.build.hash_files

    def counting_hash(paths):
        hashed.extend(paths)
        return real_hash(paths)

    monkeypatch.setattr(indexer.build, "hash_files", counting_hash)
    report = index_images([shapes_dir], db, other_checkpoint, num_workers=0)
    assert (report.version, report.activated, report.indexed) == ("v2", False, 32)
    assert hashed == []  # every file's hash came from the active version's rows

    # the old version keeps serving, from the same long-lived Searcher
    assert searcher.tables["images"].version == "v1"
    assert _ids(searcher.search("a red circle", "images", k=5)) == before
    listed = {v.id: v for v in list_versions(db)}
    assert [(v.id, v.active, v.items) for v in listed.values()] == [
        ("v1", True, 32),
        ("v2", False, 32),
    ]
    assert listed["v2"].model_id == load_checkpoint(other_checkpoint).model_id

    info = activate_version(db, "v2")
    assert info.active and info.table == "images"
    assert searcher.tables["images"].model_id == listed["v2"].model_id
    clean = tmp_path / "clean"
    index_images([shapes_dir], clean, other_checkpoint, num_workers=0)
    assert _ids(searcher.search("a red circle", "images", k=5)) == _ids(
        Searcher(clean).search("a red circle", "images", k=5)
    )
    # a run without --model now updates the active version, v2
    again = index_images([shapes_dir], db, num_workers=0)
    assert (again.version, again.indexed, again.unchanged) == ("v2", 0, 32)

    with pytest.raises(InputDataError, match="v2 is the active version of table 'images'"):
        remove_version(db, "v2")
    remove_version(db, "v1")
    assert [v.id for v in list_versions(db)] == ["v2"]
    assert not (db / "lancedb" / "images.lance").exists()  # v1's vectors are gone
    with pytest.raises(InputDataError, match="no version 'v1' in this index; its versions: v2"):
        activate_version(db, "v1")
    assert version_paths(db, "v2") == sorted(str(p) for p in shapes_dir.iterdir())


def test_readers_see_only_finished_commits(tmp_path, shapes_dir, tiny_checkpoint):
    db = tmp_path / "db"
    some = sorted(shapes_dir.iterdir())[:8]
    index_images(some, db, tiny_checkpoint, num_workers=0)
    searcher = Searcher(db)
    assert searcher.tables["images"].count == 8

    class Killed(Exception):
        pass

    def die_after_two_chunks(stage, done, total):
        if stage == "embed" and done >= 16:
            raise Killed

    with pytest.raises(Killed):  # a run that dies after writing chunks, before its commit
        index_images(
            [shapes_dir],
            db,
            num_workers=0,
            batch_size=8,
            chunk_size=8,
            progress=die_after_two_chunks,
        )
    assert len(rows(db, "images")) == 24  # the chunks are on disk (the next run resumes)...
    assert searcher.tables["images"].count == 8  # ...but readers still see the last commit
    assert len(searcher.search("a red circle", "images", k=50)) == 8
    assert len(Searcher(db).search("a red circle", "images", k=50)) == 8

    resumed = index_images([shapes_dir], db, num_workers=0)
    assert (resumed.indexed, resumed.unchanged) == (8, 24)
    assert searcher.tables["images"].count == 32
    assert len(searcher.search("a red circle", "images", k=50)) == 32


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, shapes_dir, tiny_checkpoint):
    db = tmp_path / "db"
    index_images(sorted(shapes_dir.iterdir())[:4], db, tiny_checkpoint, num_workers=0)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with write_lock(db, "a test writer"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(30)
    try:
        with pytest.raises(InputDataError, match=r"is being written by pid \d+ \(a test writer"):
            index_images([shapes_dir], db, num_workers=0)
        with pytest.raises(InputDataError, match="one writer per database"):
            remove_version(db, "v1")
    finally:
        release.set()
        thread.join()
    assert index_images([shapes_dir], db, num_workers=0).indexed == 28  # free again


def _as_format_1(db) -> None:
    """Rewrite the manifest as the code before versions wrote it (format 1)."""
    manifest = DbManifest.read(db)
    assert manifest is not None
    version = manifest.active("images")
    assert version is not None
    old = {
        "checkpoint": version.checkpoint,
        "dim": version.dim,
        "format_version": 1,
        "model_id": version.model_id,
        "tables": {
            name: {k: v for k, v in entry.items() if k != "active"}
            for name, entry in manifest.tables.items()
        },
    }
    DbManifest.path_of(db).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def test_a_database_from_before_versions_opens_serves_and_upgrades(
    tmp_path, shapes_dir, tiny_checkpoint, other_checkpoint
):
    db = tmp_path / "db"
    index_images(sorted(shapes_dir.iterdir())[:20], db, tiny_checkpoint, num_workers=0)
    want = _ids(Searcher(db).search("a blue square", "images", k=5))
    _as_format_1(db)

    searcher = Searcher(db)
    assert _ids(searcher.search("a blue square", "images", k=5)) == want
    assert searcher.tables["images"].version == "v1"
    report = index_images([shapes_dir], db, num_workers=0)  # the first write upgrades
    assert (report.version, report.indexed, report.unchanged) == ("v1", 12, 20)
    data = json.loads(DbManifest.path_of(db).read_text())
    assert data["format_version"] == 2 and data["tables"]["images"]["active"] == "v1"
    assert data["versions"]["v1"]["snapshot"] is not None
    assert len(searcher.search("a blue square", "images", k=50)) == 32
    assert index_images([shapes_dir], db, other_checkpoint, num_workers=0).version == "v2"


class QueryLoop:
    """Queries "red" in a thread until the block ends; ``seen`` names the version (a key of
    ``answers``) each answer came from; an answer that is no version's (a mix) or any error
    ends the loop and lands in ``errors``. ``compositional``: also run_query's path (embed,
    then search)."""

    def __init__(self, searcher, answers, compositional: bool = False) -> None:
        self.searcher, self.answers, self.compositional = searcher, answers, compositional
        self.seen: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _which(self, hits) -> str:
        got = [(h.id, round(h.score, 4)) for h in hits]
        return next(v for v, a in self.answers.items() if a == got)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.append(self._which(self.searcher.search("red", "images")))
                if self.compositional:  # embeds, then searches: one version for both
                    hits = run_query(self.searcher, CompositeQuery.of("red"), "images", k=10)
                    self.seen.append(self._which(hits))
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                self.errors.append(exc)
                return

    def __enter__(self) -> QueryLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_queries_during_activation_come_from_one_version(
    tmp_path, shapes_dir, tiny_checkpoint, other_checkpoint
):
    db = tmp_path / "db"
    index_images([shapes_dir], db, tiny_checkpoint, num_workers=0)
    index_images([shapes_dir], db, other_checkpoint, num_workers=0)
    answers = {}
    for vid in ("v1", "v2"):
        activate_version(db, vid)
        answers[vid] = [(h.id, round(h.score, 4)) for h in Searcher(db).search("red", "images")]
    assert answers["v1"] != answers["v2"]

    with QueryLoop(Searcher(db), answers, compositional=True) as loop:
        for i in range(10):
            activate_version(db, ("v1", "v2")[i % 2])
    assert not loop.errors, loop.errors[:1]
    assert loop.seen and set(loop.seen) <= {"v1", "v2"}


def test_a_model_mismatch_names_the_table_version(
    tmp_path, shapes_dir, tiny_checkpoint, other_checkpoint
):
    db = tmp_path / "db"
    index_images([shapes_dir], db, tiny_checkpoint, num_workers=0)
    with pytest.raises(IndexMismatchError, match="searched with beit3-tiny@.* \\(version v1\\)"):
        Searcher(db, model=other_checkpoint)
    vectors = rows(db, "images")
    assert all(np.isfinite(r["vector"]).all() for r in vectors.values())


def test_an_int8_version_is_queried_with_the_int8_encoder(tmp_path, shapes_dir, tiny_checkpoint):
    db = tmp_path / "db"
    index_images([shapes_dir], db, tiny_checkpoint, num_workers=0)
    report = index_images([shapes_dir], db, tiny_checkpoint, num_workers=0, quantize="int8")
    assert report.version == "v2"  # same model, other encoder: kept apart
    assert [(v.id, v.encoder) for v in list_versions(db)] == [("v1", "fp32"), ("v2", "int8")]
    # a run without --quantize updates the version of its model it finds first: the active one
    assert index_images([shapes_dir], db, num_workers=0).version == "v1"
    activate_version(db, "v2")
    searcher = Searcher(db)
    assert searcher.tables["images"].encoder == "int8"
    image = sorted(shapes_dir.iterdir())[3]
    stored = rows(db, "images")  # v2's rows: int8 vectors
    sha = next(s for s, r in stored.items() if r["path"] == str(image))

    def int8_linears(ckpt) -> int:
        return sum(
            type(m).__module__.startswith("torch.ao.nn.quantized") for m in ckpt.model.modules()
        )

    assert int8_linears(searcher.checkpoint_of("images")) > 0  # queries use the int8 encoder
    assert int8_linears(Searcher(db, model=tiny_checkpoint).checkpoint) > 0
    # int8 activations are quantised per batch, so a query is close to, not equal to, its row
    query = searcher.embed_query(image, "images")
    assert float(query @ stored[sha]["vector"]) > 0.98
    top = searcher.search(image, "images", k=1)[0]
    assert top.id == sha and top.score > 0.98
    with pytest.raises(InputDataError, match="--quantize: unknown mode 'int4'"):
        index_images([shapes_dir], db, num_workers=0, quantize="int4")


def test_a_new_version_keeps_captions_and_moves_and_removal_tidy_up(
    tmp_path, shapes_dir, tiny_checkpoint, other_checkpoint
):
    import shutil

    manifest = tmp_path / "captions.jsonl"
    images = sorted(shapes_dir.iterdir())
    manifest.write_text(
        "".join(json.dumps({"image": str(p), "text": f"caption {p.stem}"}) + "\n" for p in images)
    )
    db = tmp_path / "a" / "db"
    index_images([manifest], db, tiny_checkpoint, num_workers=0)
    # the new model's version is built from the bare folder (as beit3 improve re-indexes)
    kept = tmp_path / "a" / "db" / "models" / "other"
    shutil.copytree(other_checkpoint, kept)
    assert index_images([shapes_dir], db, kept, num_workers=0, activate=True).version == "v2"
    texts = {r["path"]: r["text"] for r in rows(db, "images").values()}
    assert texts == {str(p): f"caption {p.stem}" for p in images}

    moved = tmp_path / "b" / "c" / "d" / "db"  # another depth: the relative path breaks
    moved.parent.mkdir(parents=True)
    shutil.move(db, moved)
    activate_version(moved, "v1")  # v1's checkpoint is found by its absolute path
    assert Searcher(moved).tables["images"].version == "v1"
    remove_version(moved, "v2")
    assert not (moved / "models" / "other").exists()  # its checkpoint lived in the database
    assert tiny_checkpoint.is_dir()


def test_queries_while_a_new_version_is_built_and_activated(
    tmp_path, shapes_dir, tiny_checkpoint, other_checkpoint
):
    db, clean = tmp_path / "db", tmp_path / "clean"
    index_images([shapes_dir], db, tiny_checkpoint, num_workers=0)
    index_images([shapes_dir], clean, other_checkpoint, num_workers=0)
    answers = {
        name: [(h.id, round(h.score, 4)) for h in Searcher(where).search("red", "images")]
        for name, where in (("old", db), ("new", clean))
    }
    with QueryLoop(Searcher(db), answers) as loop:
        report = index_images(
            [shapes_dir],
            db,
            other_checkpoint,
            num_workers=0,
            batch_size=4,
            chunk_size=4,
            activate=True,
        )
        deadline = time.monotonic() + 30
        while loop.seen[-1:] != ["new"] and not loop.errors and time.monotonic() < deadline:
            time.sleep(0.05)
    seen = loop.seen
    assert report.activated and not loop.errors, loop.errors[:1]
    # every answer is one version's (a mix raises in the loop); old while building, then new
    assert seen[0] == "old" and seen[-1] == "new"
    assert seen == sorted(seen, key=("old", "new").index)  # one switch
