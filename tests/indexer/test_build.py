import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image, ImageOps

from beit3 import CheckpointError, IndexMismatchError, InputDataError
from indexer import Searcher, index_images, index_texts
from tests.indexer.helpers import rows, write_bad_images, write_odd_images


def test_index_images_counts_every_item_and_skips_bad_ones_with_reasons(
    tmp_path, shapes_dir, tiny_checkpoint
):
    odd = write_odd_images(shapes_dir / "odd")
    reasons = write_bad_images(shapes_dir / "bad")
    (shapes_dir / "copies").mkdir()
    for name in ("red_circle_0.png", "blue_cross_0.png"):
        shutil.copy(shapes_dir / name, shapes_dir / "copies" / name)
    (shapes_dir / "readme.txt").write_text("not an image extension: ignored")
    (shapes_dir / ".hidden").mkdir()
    shutil.copy(shapes_dir / "red_circle_0.png", shapes_dir / ".hidden" / "x.png")

    report = index_images(
        [shapes_dir], tmp_path / "db", tiny_checkpoint, num_workers=0, batch_size=7
    )

    assert (
        report.seen,
        report.indexed,
        report.duplicates,
        report.unchanged,
        report.skipped,
        report.removed,
    ) == (32 + 2 + len(odd) + len(reasons), 32 + len(odd), 2, 0, 5, 0)
    got = {os.path.basename(path): reason for path, reason in report.skipped_reasons}
    assert set(got) == set(reasons)
    for name, start in reasons.items():
        assert got[name].startswith(start), (name, got[name])
        assert "\n" not in got[name]
    assert "skipped 5" in str(report) and "\n" not in str(report)

    table = rows(tmp_path / "db", "images")
    assert len(table) == 32 + len(odd)
    red = next(r for r in table.values() if r["path"].endswith("/red_circle_0.png"))
    assert red["paths"] == sorted(
        [str(shapes_dir / "copies/red_circle_0.png"), str(shapes_dir / "red_circle_0.png")]
    )
    assert red["path"] == red["paths"][0] and len(red["mtimes"]) == 2
    assert red["model_id"].startswith("beit3-tiny@") and red["modality"] == "image"
    assert red["size"] == (shapes_dir / "red_circle_0.png").stat().st_size
    vectors = np.stack([r["vector"] for r in table.values()])
    assert vectors.dtype == np.float32 and vectors.shape == (len(table), 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_exif_rotation_is_applied_before_embedding(tmp_path, shapes_dir, tiny_checkpoint):
    write_odd_images(shapes_dir / "odd")
    db = tmp_path / "db"
    index_images([shapes_dir / "odd" / "rotated.jpg"], db, tiny_checkpoint, num_workers=0)
    stored = next(iter(rows(db, "images").values()))["vector"]
    searcher = Searcher(db)
    raw = Image.open(shapes_dir / "odd" / "rotated.jpg")
    raw.load()
    upright = searcher.embed_query(ImageOps.exif_transpose(raw).convert("RGB"))
    sideways = searcher.embed_query(raw.convert("RGB"))
    assert float(np.dot(stored, upright)) > 0.9999
    assert float(np.dot(stored, sideways)) < float(np.dot(stored, upright)) - 1e-4


def test_rerun_embeds_nothing_and_touched_files_are_not_reembedded(
    tmp_path, shapes_dir, tiny_checkpoint
):
    db = tmp_path / "db"
    first = index_images([shapes_dir], db, tiny_checkpoint, num_workers=0)
    before = rows(db, "images")
    later = time.time() + 10
    os.utime(shapes_dir / "red_circle_0.png", (later, later))  # same bytes, new mtime

    again = index_images([shapes_dir], db, num_workers=0)  # model taken from the index

    assert (first.indexed, again.indexed, again.unchanged, again.removed) == (32, 0, 32, 0)
    after = rows(db, "images")
    assert after.keys() == before.keys()
    sha = next(s for s, r in after.items() if r["path"].endswith("red_circle_0.png"))
    assert after[sha]["mtimes"] == [later]  # recorded, so the next run skips hashing it
    np.testing.assert_array_equal(after[sha]["vector"], before[sha]["vector"])


@pytest.mark.parametrize("backend", ["lancedb", "faiss"])
def test_deleted_file_disappears_and_changed_file_is_reembedded(
    tmp_path, shapes_dir, tiny_checkpoint, backend
):
    db = tmp_path / "db"
    index_images([shapes_dir], db, tiny_checkpoint, backend=backend, num_workers=0)
    searcher = Searcher(db)
    gone = shapes_dir / "green_square_0.png"
    gone_id = next(h.id for h in searcher.search(gone, "images", k=1))
    gone.unlink()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(shapes_dir / "blue_circle_0.png")

    report = index_images([shapes_dir], db, num_workers=0)

    assert (report.seen, report.indexed, report.unchanged, report.removed) == (31, 1, 30, 1)
    table = rows(db, "images")
    paths = {p for r in table.values() for p in r["paths"]}
    assert str(gone) not in paths and len(table) == 31
    assert searcher.get("images", gone_id) is None
    hits = searcher.search("a green square", "images", k=40)
    assert len(hits) == 31 and str(gone) not in {h.path for h in hits}
    top = searcher.search(shapes_dir / "blue_circle_0.png", "images", k=1)[0]
    assert top.path == str(shapes_dir / "blue_circle_0.png") and top.score > 0.9999


def test_other_folders_of_the_table_are_kept_but_their_deleted_files_go(
    tmp_path, shapes_dir, tiny_checkpoint
):
    db = tmp_path / "db"
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(other / "a.png")
    Image.new("RGB", (40, 40), (9, 8, 7)).save(other / "b.png")
    index_images([other], db, tiny_checkpoint, num_workers=0)
    (other / "b.png").unlink()

    report = index_images([shapes_dir], db, num_workers=0)

    assert (report.indexed, report.removed) == (32, 1)
    paths = {p for r in rows(db, "images").values() for p in r["paths"]}
    assert str(other / "a.png") in paths and str(other / "b.png") not in paths


def test_manifest_of_image_paths_is_read_relative_to_itself(tmp_path, shapes_dir, tiny_checkpoint):
    (shapes_dir / "list.jsonl").write_text(
        '{"image": "red_circle_0.png", "text": "a red circle"}\n'
        '{"image": "missing.png"}\n'
        "not json\n"
        '{"caption": "no image field"}\n'
    )
    (shapes_dir / "list.csv").write_text("file,text\nblue_cross_0.png,a blue cross\n")

    report = index_images(
        [shapes_dir / "list.jsonl", shapes_dir / "list.csv"],
        tmp_path / "db",
        tiny_checkpoint,
        num_workers=0,
    )

    assert (report.seen, report.indexed, report.skipped) == (5, 2, 3)
    reasons = sorted(r for _, r in report.skipped_reasons)
    assert (
        reasons[0].startswith("invalid JSON")
        and reasons[1]
        == "no image column 'image'"  # the column that the manifest's first row named
        and reasons[2] == "no such file"
    )
    assert {r["path"] for r in rows(tmp_path / "db", "images").values()} == {
        str(shapes_dir / "red_circle_0.png"),
        str(shapes_dir / "blue_cross_0.png"),
    }


def test_worker_processes_give_the_same_vectors(tmp_path, shapes_dir, tiny_checkpoint):
    index_images([shapes_dir], tmp_path / "a", tiny_checkpoint, num_workers=0, batch_size=32)
    index_images([shapes_dir], tmp_path / "b", tiny_checkpoint, num_workers=2, batch_size=5)
    a, b = rows(tmp_path / "a", "images"), rows(tmp_path / "b", "images")
    assert a.keys() == b.keys()
    for sha in a:
        np.testing.assert_allclose(a[sha]["vector"], b[sha]["vector"], atol=1e-5)


def test_another_model_builds_a_version_and_queries_check_the_model(
    tmp_path, shapes_dir, tiny_checkpoint, other_checkpoint
):
    db = tmp_path / "db"
    index_images([shapes_dir], db, tiny_checkpoint, num_workers=0)
    report = index_images([shapes_dir], db, other_checkpoint, num_workers=0)
    assert (report.version, report.activated, report.indexed) == ("v2", False, 32)
    with pytest.raises(IndexMismatchError) as info:
        Searcher(db, model=other_checkpoint)
    message = str(info.value)
    assert message.startswith(f"table 'images' of index {db} is searched with beit3-tiny@")
    assert "the query model is beit3-tiny@" in message and "beit3 versions activate" in message
    with pytest.raises(IndexMismatchError, match="holds images, not texts"):
        index_texts(shapes_dir / "red_circle_0.png", db, table="images")
    with pytest.raises(IndexMismatchError, match="is a lancedb table, not faiss"):
        index_images([shapes_dir], db, backend="faiss", num_workers=0)


def test_new_db_needs_a_model_and_a_missing_source_is_an_error(
    tmp_path, shapes_dir, tiny_checkpoint
):
    with pytest.raises(InputDataError, match="holds no index yet .* pass --model"):
        index_images([shapes_dir], tmp_path / "db")
    with pytest.raises(InputDataError, match="nope: no such file or folder"):
        index_images([tmp_path / "nope"], tmp_path / "db", tiny_checkpoint)
    with pytest.raises(InputDataError, match="table name 'a b' is not allowed"):
        index_images([shapes_dir], tmp_path / "db", tiny_checkpoint, table="a b")


def test_a_pretraining_checkpoint_is_refused_with_a_hint(tmp_path, shapes_dir, tokenizer):
    from beit3 import create_model, save_checkpoint

    path = tmp_path / "pretrained"
    save_checkpoint(
        create_model("beit3-tiny", "pretraining", codebook_size=16),
        path,
        preset="beit3-tiny",
        tokenizer=tokenizer,
    )
    with pytest.raises(CheckpointError, match="is a pretraining checkpoint; .*fine-tune it first"):
        index_images([shapes_dir], tmp_path / "db", path)
    assert not (tmp_path / "db").exists() or not any((tmp_path / "db").iterdir())


def test_moved_checkpoint_is_reported_with_a_hint(tmp_path, shapes_dir, tiny_checkpoint):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    db = tmp_path / "db"
    index_images([shapes_dir / "red_circle_0.png"], db, ckpt, num_workers=0)
    ckpt.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="which no longer exists; pass --model"):
        Searcher(db)
    assert Searcher(db, model=tmp_path / "moved").tables["images"].count == 1


def test_texts_are_embedded_once_and_follow_edits(tmp_path, tiny_checkpoint):
    source = tmp_path / "caps.txt"
    source.write_text("a red circle\na blue square\n\na red circle\na green cross\n")
    db = tmp_path / "db"

    first = index_texts(source, db, tiny_checkpoint)
    assert (first.seen, first.indexed, first.duplicates, first.skipped) == (4, 3, 1, 0)
    red = next(r for r in rows(db, "texts").values() if r["text"] == "a red circle")
    assert red["paths"] == [f"{source}:1", f"{source}:4"] and red["path"] is None

    source.write_text("a yellow cross\na red circle\na blue square\na green cross\n")
    second = index_texts(source, db)

    assert (second.seen, second.indexed, second.unchanged, second.duplicates, second.removed) == (
        4,
        1,
        0,
        3,
        1,
    )
    table = rows(db, "texts")
    assert sorted(r["text"] for r in table.values()) == [
        "a blue square",
        "a green cross",
        "a red circle",
        "a yellow cross",
    ]
    red = next(r for r in table.values() if r["text"] == "a red circle")
    assert red["paths"] == [f"{source}:2"]


def test_bad_texts_are_skipped_with_one_line_reasons(tmp_path, tiny_checkpoint):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_bytes(
        b'{"caption": "a red circle"}\n'
        b'{"caption": ""}\n'
        b'{"caption": "' + b"x" * 10_001 + b'"}\n'
        b'{"caption": "caf\xe9"}\n'
        b'{"caption": 3}\n'
        b'"a bare string"\n'
    )
    report = index_texts(jsonl, tmp_path / "db", tiny_checkpoint)
    assert (report.seen, report.indexed, report.skipped) == (6, 2, 4)
    reasons = dict(report.skipped_reasons)
    assert reasons[f"{jsonl}:2"] == "empty text"
    assert reasons[f"{jsonl}:3"] == "text too long (10,001 characters > 10,000); split it"
    assert reasons[f"{jsonl}:4"] == "invalid UTF-8 (byte 0xe9 at column 17)"
    assert reasons[f"{jsonl}:5"] == "column 'caption' is int, not a string"

    csv = tmp_path / "t.csv"
    csv.write_bytes(b"id,sentence\n1,a blue cross\n2,\n3,bad \xff byte\n")
    report = index_texts(csv, tmp_path / "db", column="sentence", table="csv")
    assert (report.seen, report.indexed, report.skipped) == (3, 1, 2)
    assert dict(report.skipped_reasons) == {f"{csv}:3": "empty text", f"{csv}:4": "invalid UTF-8"}
    with pytest.raises(InputDataError, match="no text column 'nope'; its columns are id, sentence"):
        index_texts(csv, tmp_path / "db", column="nope", table="csv")

    txt = tmp_path / "t.txt"
    txt.write_bytes(b"fine\n\xc3\x28 broken\n")
    report = index_texts(txt, tmp_path / "db", table="txt")
    assert report.skipped_reasons == [(f"{txt}:2", "invalid UTF-8 (byte 0xc3 at column 1)")]


def test_index_and_checkpoint_can_move_together(tmp_path, shapes_dir, tiny_checkpoint):
    project = tmp_path / "project"
    ckpt = shutil.copytree(tiny_checkpoint, project / "model")
    index_images([shapes_dir / "red_circle_0.png"], project / "index", ckpt, num_workers=0)
    project.rename(tmp_path / "moved")
    searcher = Searcher(tmp_path / "moved" / "index")
    assert searcher.checkpoint.path == tmp_path / "moved" / "model"
    assert searcher.search("a red circle", "images", k=1)[0].path == str(
        shapes_dir / "red_circle_0.png"
    )


@pytest.mark.gpu
def test_cuda_bf16_embeddings_match_cpu(tmp_path, shapes_dir, tiny_checkpoint):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    index_images([shapes_dir], tmp_path / "cpu", tiny_checkpoint, device="cpu", num_workers=0)
    index_images([shapes_dir], tmp_path / "gpu", tiny_checkpoint, device="cuda", num_workers=2)
    cpu, gpu = rows(tmp_path / "cpu", "images"), rows(tmp_path / "gpu", "images")
    assert cpu.keys() == gpu.keys()
    for sha in cpu:  # bf16 autocast on GPU: close, not equal
        assert float(np.dot(cpu[sha]["vector"], gpu[sha]["vector"])) > 0.99
    hits = Searcher(tmp_path / "gpu", device="cuda").search(
        shapes_dir / "red_circle_0.png", "images", k=1
    )
    assert hits[0].path == str(shapes_dir / "red_circle_0.png")


@pytest.mark.parametrize("backend", ["lancedb", "faiss"])
def test_manifest_captions_label_images_and_relabel_without_embedding(
    tmp_path, shapes_dir, tiny_checkpoint, backend
):
    import json

    manifest = tmp_path / "labels.jsonl"
    names = sorted(p.name for p in shapes_dir.iterdir())[:3]
    manifest.write_text(
        "".join(
            json.dumps({"image": f"shapes/{n}", "text": n.split(".")[0].replace("_", " ")}) + "\n"
            for n in names
        )
    )
    db = tmp_path / "db"
    first = index_images([manifest], db, tiny_checkpoint, backend=backend, num_workers=0)
    assert first.indexed == 3
    hit = Searcher(db).search(shapes_dir / names[0], "images", k=1)[0]
    assert hit.text == names[0].split(".")[0].replace("_", " ")
    manifest.write_text(manifest.read_text().replace('"text": "', '"text": "new '))
    again = index_images([manifest], db, tiny_checkpoint, num_workers=0)
    assert again.indexed == 0
    assert again.unchanged == 3
    assert Searcher(db).get("images", hit.id).text.startswith("new ")
