import io
import json
import tarfile

import pytest
import torch

from beit3 import ImageTransform, InputDataError, PreprocessConfig
from beit3.data import (
    PairDataset,
    ResumableSampler,
    TextLineDataset,
    WebDatasetPairs,
    collate_pairs,
    expand_shards,
    group_by_image,
    read_pairs,
    read_texts,
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
    assert records[0].image == str((tmp_path / "imgs" / "a.png").resolve())
    images, texts, owner = group_by_image(records)
    assert len(images) == 2
    assert owner == [0, 0, 1]
    assert texts[2] == "a blue circle"


def test_csv_manifest_and_column_names(tmp_path):
    _img(tmp_path / "x.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,title,other\nx.png,a red circle,1\n")
    assert read_pairs(manifest)[0].text == "a red circle"
    with pytest.raises(InputDataError, match="no column 'caption'"):
        read_pairs(manifest, text_column="caption")


def test_folder_with_txt_captions_skips_uncaptioned(tmp_path, caplog):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red circle\n\na red disc\n")
    _img(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("a red thing")
    _img(tmp_path / "lonely.png")
    records = read_pairs(tmp_path)
    assert sorted(r.text for r in records) == ["a red circle", "a red disc", "a red thing"]
    assert "1 images have no" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"image": "a.png", "text": "x"}\n{broken\n', r"m\.jsonl:2: invalid JSON"),
        ('{"picture": "a.png", "text": "x"}\n', "no image column"),
        ('{"image": "a.png", "text": ""}\n', "no usable image-text pairs"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_bad_manifests_name_the_file_and_row(tmp_path, content, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    with pytest.raises(InputDataError, match=message):
        read_pairs(manifest)


def test_invalid_utf8_and_missing_source(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_bytes(b'{"image": "a.png", "text": "\xff\xfe"}\n')
    with pytest.raises(InputDataError, match="not valid UTF-8"):
        read_pairs(bad)
    with pytest.raises(InputDataError, match="no such file"):
        read_pairs(tmp_path / "nope.jsonl")


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
