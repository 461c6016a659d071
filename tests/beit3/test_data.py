import io
import json
import logging
import os
import tarfile

import pytest
import torch

from beit3 import ImageTransform, InputDataError, PreprocessConfig
from beit3.data import (
    expand_shards,
    group_by_image,
    list_images,
    read_captions,
    read_pairs,
    read_rows,
    read_texts,
)
from beit3.datasets import (
    ImageFiles,
    PairDataset,
    ResumableSampler,
    TextLineDataset,
    WebDatasetPairs,
    collate_pairs,
)
from tests.data import shape_image


def _img(path, color="red", shape="circle"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape_image(color, shape, 32).save(path)
    return path


def test_jsonl_manifest_with_several_captions_and_extra_columns(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png", "blue")
    rows = [
        {"image": "imgs/a.png", "caption": ["a red circle", "  a  round red thing "], "id": 7},
        {"image": "imgs/b.png", "caption": "a blue circle", "license": "cc"},
        {"image": "imgs/c.png", "caption": ""},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_pairs(manifest)
    assert [r.text for r in records] == ["a red circle", "a round red thing", "a blue circle"]
    assert records[0].image == os.path.abspath(tmp_path / "imgs" / "a.png")
    images, texts, owner = group_by_image(records)
    assert len(images) == 2
    assert owner == [0, 0, 1]
    assert texts[2] == "a blue circle"


def test_csv_manifest_and_column_names(tmp_path):
    _img(tmp_path / "x.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,title,other\nx.png,a red circle,1\n")
    assert read_pairs(manifest)[0].text == "a red circle"
    with pytest.raises(InputDataError, match="no text column 'caption'; its columns are file"):
        read_pairs(manifest, text_column="caption")


def test_folder_with_txt_captions_skips_uncaptioned(tmp_path, caplog):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red circle\n\na red disc\n")
    _img(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("a red thing")
    _img(tmp_path / "lonely.png")
    records = read_pairs(tmp_path)
    assert sorted(r.text for r in records) == ["a red circle", "a red disc", "a red thing"]
    assert f"skipped {tmp_path / 'lonely.png'}: no caption file lonely.txt" in caplog.text


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"picture": "a.png", "text": "x"}\n', "no image column (none of image, image_path,"),
        (b'{"image": "a.png", "text": ""}\n', "empty text"),
        (b"[1, 2]\n", "expected a JSON object, got list"),
        (b"{broken\n", "invalid JSON (Expecting property name"),
        (b'{"image": "a.png", "text": "\xff\xfe"}\n', "invalid UTF-8 (byte 0xff at column 29)"),
    ],
)
def test_a_manifest_without_any_usable_row_is_an_error_after_its_skips(
    tmp_path, caplog, content, reason
):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(content)
    with pytest.raises(InputDataError, match=r"m\.jsonl: no usable image-text pairs"):
        read_pairs(manifest)
    assert f"skipped {manifest}:1: {reason}" in caplog.text


def test_a_missing_source_is_an_error(tmp_path):
    with pytest.raises(InputDataError, match="nope.jsonl: no such file or folder"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "a.txt").write_text("a caption\n")  # texts only: not a source of pairs
    with pytest.raises(InputDataError, match=r"a\.txt: unknown manifest type '\.txt'"):
        read_pairs(tmp_path / "a.txt")


def test_dataset_skips_broken_images_once_and_collates(tmp_path, tokenizer, caplog):
    good = _img(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps({"image": p.name, "text": t})
            for p, t in [(good, "a red circle"), (broken, "x"), (broken, "y")]
        )
    )
    ds = PairDataset(read_pairs(manifest), ImageTransform(PreprocessConfig(img_size=32)), tokenizer)
    samples = [ds[i] for i in range(len(ds))]
    assert samples[1] is None
    assert samples[2] is None
    assert caplog.text.count("broken.png") == 1
    batch = collate_pairs(samples)
    assert batch.images.shape == (1, 3, 32, 32)
    assert batch.text_ids[0, 0].item() == 0
    assert not batch.padding_mask[0, 0]
    assert collate_pairs([None]) is None


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(color):
    buf = io.BytesIO()
    shape_image(color, "square", 32).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards_stream_and_split_by_rank(tmp_path, tokenizer):
    for s in range(2):
        _write_shard(
            tmp_path / f"shard-{s:03d}.tar",
            [
                (f"s{s}a.png", _png("red")),
                (f"s{s}a.txt", b"a red square"),
                (f"s{s}b.jpg", b"not an image"),
                (f"s{s}b.txt", b"broken"),
                (f"s{s}c.png", _png("blue")),
                (f"s{s}c.json", b'{"caption": "a blue square"}'),
                (f"s{s}d.png", _png("green")),  # no caption: skipped
            ],
        )
    shards = expand_shards(tmp_path / "shard-{000..001}.tar")
    assert [p.name for p in shards] == ["shard-000.tar", "shard-001.tar"]
    transform = ImageTransform(PreprocessConfig(img_size=32))
    every = [s for s in WebDatasetPairs(shards, transform, tokenizer) if s is not None]
    assert [tokenizer.decode(s["text_ids"]) for s in every] == ["a red square", "a blue square"] * 2
    rank0 = [s for s in WebDatasetPairs(shards, transform, tokenizer, 0, 2) if s is not None]
    rank1 = [s for s in WebDatasetPairs(shards, transform, tokenizer, 1, 2) if s is not None]
    assert len(rank0) == len(rank1) == 2
    # Shard 0 goes to rank 0 and shard 1 to rank 1: together they are everything, once.
    assert [s["index"] for s in rank0] == [0, 1]
    assert sum(torch.equal(a["image"], b["image"]) for a in rank0 for b in rank1) == 2
    with pytest.raises(InputDataError, match="does not exist"):
        expand_shards(tmp_path / "shard-{000..002}.tar")


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    s = ResumableSampler(10, seed=3)
    full = list(s)
    s.set_position(0, 4)
    assert list(s) == full[4:]
    s.set_position(1)
    assert list(s) != full
    assert sorted(list(s)) == list(range(10))
    ranks = [list(ResumableSampler(10, r, 3, seed=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)
    assert set().union(*map(set, ranks)) == set(range(10))


def test_read_texts_from_txt_jsonl_and_csv(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("one\n\n  two  words \n")
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n{"text": ["four", "five"]}\n')
    (tmp_path / "c.csv").write_text("caption,x\nsix,1\n")
    assert list(read_texts(tmp_path / "a.txt")) == ["one", "two words"]
    assert list(read_texts(tmp_path / "b.jsonl")) == ["three", "four", "five"]
    assert list(read_texts(tmp_path / "c.csv")) == ["six"]
    assert TextLineDataset(["a red circle"], tokenizer)[0][0] == 0


def test_text_line_dataset_keeps_every_text_exactly(tokenizer):
    texts = ["a red circle", "", "naïve café ☕ 🐱", "x" * 300, "日本の旗"]
    data = TextLineDataset(iter(texts), tokenizer)  # any iterable, read once
    assert len(data) == len(texts)
    assert [data.text(i) for i in range(len(texts))] == texts
    assert data[2] == tokenizer.encode(texts[2])
    with pytest.raises(InputDataError, match="text-only stream is empty"):
        TextLineDataset([], tokenizer)


def _bad_rows_manifest(tmp_path):
    """A JSONL manifest with two good rows and every kind of bad row; -> (path, skips by kind)."""
    for name in ("a.png", "b.png", "c.png"):
        _img(tmp_path / name)
    lines = [
        b'{"image": "a.png", "caption": "a red circle"}',
        b"{broken",
        b"[1, 2]",
        b'{"caption": "no image"}',
        b'{"image": "", "caption": "x"}',
        b'{"image": 3, "caption": "y"}',
        b'{"image": "b.png", "caption": ""}',
        b'{"image": "b.png", "caption": 3}',
        b'{"image": "b.png", "caption": "caf\xe9"}',
        b'{"image": "b.png", "caption": null}',
        b"",
        b'{"image": "c.png", "caption": ["a  blue one", "  two  "], "extra": 1}',
    ]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    invalid = "invalid JSON (Expecting property name enclosed in double quotes)"
    not_images = {
        2: invalid,
        3: "expected a JSON object, got list",
        4: "no image column 'image'",
        5: "empty image path",
        6: "column 'image' is int, not a string",
        9: "invalid UTF-8 (byte 0xe9 at column 35)",  # an undecodable line is no row at all
    }
    not_texts = {
        7: "empty text",
        8: "column 'caption' is int, not a string",
        10: "no value in column 'caption'",
    }
    return path, not_images, not_texts


def _where(path, skips):
    return [(f"{path}:{n}", reason) for n, reason in sorted(skips.items())]


def test_bad_rows_are_skipped_counted_and_logged_one_line_each(tmp_path, caplog):
    path, not_images, not_texts = _bad_rows_manifest(tmp_path)
    with caplog.at_level(logging.WARNING, logger="beit3.data"):
        records = read_pairs(path)
    assert [(os.path.basename(r.image), r.text) for r in records] == [
        ("a.png", "a red circle"),
        ("c.png", "a blue one"),
        ("c.png", "two"),
    ]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    want = _where(path, not_images | not_texts)
    assert lines == [f"skipped {where}: {reason}" for where, reason in want]

    # The same file read for images (a caption is an optional label) and for texts.
    skipped: list = []
    images = list(read_rows(path, "image", skipped=skipped))
    assert [os.path.basename(r.image) for r in images] == ["a.png", *["b.png"] * 3, "c.png"]
    assert skipped == _where(path, not_images)
    skipped = []
    texts = [t for r in read_rows(path, "text", skipped=skipped) for t in r.texts]
    assert texts == ["a red circle", "no image", "x", "y", "a blue one", "two"]
    assert skipped == _where(path, {n: not_images[n] for n in (2, 3, 9)} | not_texts)


def test_json_array_tsv_and_csv_manifests_name_their_lines(tmp_path):
    rows = [
        {"image": "a.png", "caption": "a red circle"},
        {"image": "b.png", "caption": ""},
        {"image": "c.png", "caption": ["x", "y"]},
    ]
    array = tmp_path / "m.json"
    array.write_text(json.dumps(rows, indent=2))  # each object spans 4 lines, from line 2
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in rows))
    tsv = tmp_path / "m.tsv"
    tsv.write_text(
        "image\tcaption\n" + "".join(f"{r['image']}\t{r['caption']}\n" for r in rows[:2])
    )
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"path,title\na.png,a red circle\nb.png\n,empty path\nc.png,caf\xe9\n")
    expected = {
        array: ([("a.png", ("a red circle",)), ("c.png", ("x", "y"))], {6: "empty text"}),
        lines: ([("a.png", ("a red circle",)), ("c.png", ("x", "y"))], {2: "empty text"}),
        tsv: ([("a.png", ("a red circle",))], {3: "empty text"}),
        csv: (
            [("a.png", ("a red circle",))],
            {3: "no value in column 'title'", 4: "empty image path", 5: "invalid UTF-8"},
        ),
    }
    for path, (want_rows, want_skips) in expected.items():
        skipped: list = []
        got = [
            (os.path.basename(r.image), r.texts) for r in read_rows(path, "pair", skipped=skipped)
        ]
        assert (got, skipped) == (want_rows, _where(path, want_skips)), path

    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"image": "a.png", "text": "one"},\n  {"image": \n')
    skipped = []
    assert [r.texts for r in read_rows(broken, "pair", skipped=skipped)] == [("one",)]
    assert skipped[0][0] == f"{broken}:4" and skipped[0][1].endswith("the rest of the file skipped")


def test_list_images_and_captions_of_every_source_kind(tmp_path, caplog):
    folder = tmp_path / "imgs"
    _img(folder / "a.png")
    _img(folder / "sub" / "B.JPG")
    _img(folder / ".hidden" / "c.png")
    (folder / "a.txt").write_text("a red circle\n")
    assert list_images(folder) == [str(folder / "a.png"), str(folder / "sub" / "B.JPG")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "imgs/a.png"}\n{"image": "imgs/a.png", "text": "again"}\n')
    assert list_images(manifest) == [str(folder / "a.png")]  # uncaptioned rows are images too
    assert list(read_captions(folder)) == ["a red circle"]
    assert list(read_captions(manifest)) == ["again"]
    _write_shard(
        tmp_path / "s.tar",
        [
            ("0.png", _png("red")),
            ("0.txt", b"a red square\n\na  square"),
            ("1.png", _png("blue")),
            ("1.json", b'{"sentence": "a blue square"}'),
            ("2.png", _png("green")),
        ],
    )
    assert list(read_captions(tmp_path / "s.tar")) == ["a red square", "a square", "a blue square"]
    assert f"skipped {tmp_path / 's.tar'}:2: no caption (.txt or .json)" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(InputDataError, match="no such file or folder"):
        list_images(tmp_path / "nothing-here.jsonl")


def test_image_files_decode_like_load_image_tensor_and_report_failures(tmp_path):
    from beit3.transforms import load_image_tensor

    preprocess = PreprocessConfig(img_size=32)
    good = tmp_path / "big.jpg"
    shape_image("red", "circle", 200).save(good, quality=90)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    files = ImageFiles([str(broken), str(good)], preprocess)
    batch = ImageFiles.collate([files[0], files[1]])
    assert batch.positions == [1]
    assert batch.failures == [(0, "not a readable image (unknown or corrupt format)")]
    assert torch.equal(batch.images[0], load_image_tensor(good, preprocess))
