import io
import itertools
import json
import logging
import tarfile

import pytest
import torch

from beit3 import InputDataError, PreprocessConfig
from beit3.data import is_shard_source
from tests.data import shape_image
from training import TrainData

PRE = PreprocessConfig(img_size=32)


def _img(path, color="red", shape="circle"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape_image(color, shape, 32).save(path)
    return path


def _texts(batch, tokenizer):
    return sorted(tokenizer.decode(ids) for ids in batch.text_ids)


def _one_epoch(data):
    return list(itertools.islice(iter(data), data.batches_per_epoch))


def test_jsonl_with_several_captions_broken_and_captionless_images(tmp_path, tokenizer, caplog):
    _img(tmp_path / "a.png")
    _img(tmp_path / "d.png", "blue", "square")
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    rows = [
        {"image": "a.png", "caption": ["a red circle", "a round red thing"], "id": 7},
        {"image": "b.png", "caption": "a broken picture"},
        {"image": "c.png", "caption": ""},  # no caption: dropped by the reader
        {"image": "d.png", "caption": "a blue square"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    data = TrainData(manifest, tokenizer=tokenizer, preprocess=PRE, batch_size=4, seed=1)
    assert data.num_pairs == 4 and data.batches_per_epoch == 1
    with caplog.at_level(logging.WARNING):
        epochs = [_one_epoch(data)[0] for _ in range(2)]
    for batch in epochs:
        assert batch.images.shape == (3, 3, 32, 32)  # the broken image's pair is dropped
        assert _texts(batch, tokenizer) == ["a blue square", "a red circle", "a round red thing"]
    assert caplog.text.count("b.png") == 1  # reported once, not once per epoch
    assert data.position() == {"epoch": 1, "batch": 1}  # the end of epoch 1


def test_csv_manifest_and_caption_folder(tmp_path, tokenizer):
    _img(tmp_path / "csv" / "x.png")
    (tmp_path / "csv" / "pairs.csv").write_text("file,title,extra\nx.png,a red circle,1\n")
    data = TrainData(
        tmp_path / "csv" / "pairs.csv", tokenizer=tokenizer, preprocess=PRE, batch_size=1
    )
    assert _texts(_one_epoch(data)[0], tokenizer) == ["a red circle"]

    folder = tmp_path / "folder"
    _img(folder / "one.png")
    (folder / "one.txt").write_text("a red circle\na round red thing\n")
    _img(folder / "sub" / "two.jpg", "green", "cross")
    (folder / "sub" / "two.txt").write_text("a green cross")
    _img(folder / "three.png", "black", "square")  # no .txt: skipped
    data = TrainData(folder, tokenizer=tokenizer, preprocess=PRE, batch_size=3)
    assert not is_shard_source(folder)
    assert _texts(_one_epoch(data)[0], tokenizer) == [
        "a green cross",
        "a red circle",
        "a round red thing",
    ]


def _png(color):
    buf = io.BytesIO()
    shape_image(color, "square", 32).save(buf, format="PNG")
    return buf.getvalue()


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_stream_resume_and_skip_broken(tmp_path, tokenizer):
    colors = ["red", "blue", "green", "yellow"]
    for s in range(2):
        samples = []
        for i, color in enumerate(colors):
            samples += [
                (f"s{s}_{i}.png", _png(color)),
                (f"s{s}_{i}.txt", f"a {color} square".encode()),
            ]
        samples += [
            (f"s{s}_x.jpg", b"broken"),
            (f"s{s}_x.txt", b"a broken image"),
            (f"s{s}_j.png", _png("purple")),
            (f"s{s}_j.json", b'{"caption": "a purple square"}'),
            (f"s{s}_n.png", _png("black")),
        ]  # no caption
        _write_shard(tmp_path / f"shard-{s}.tar", samples)
    pattern = tmp_path / "shard-{0..1}.tar"
    assert is_shard_source(pattern) and is_shard_source(tmp_path)
    data = TrainData(
        pattern, tokenizer=tokenizer, preprocess=PRE, batch_size=5, seed=3, shuffle_buffer=3
    )
    stream = iter(data)
    first = [next(stream) for _ in range(4)]  # 10 good samples per epoch = 2 batches
    assert data.position() == {"epoch": 1, "batch": 2}
    epoch0 = sorted(t for b in first[:2] for t in _texts(b, tokenizer))
    assert epoch0 == sorted([f"a {c} square" for c in [*colors, "purple"]] * 2)
    assert _texts(first[0], tokenizer) != _texts(first[2], tokenizer)  # reshuffled per epoch
    resumed = TrainData(
        pattern, tokenizer=tokenizer, preprocess=PRE, batch_size=5, seed=3, shuffle_buffer=3
    )
    resumed.set_position(1, 1)
    again = next(iter(resumed))
    assert torch.equal(again.images, first[3].images)
    assert torch.equal(again.text_ids, first[3].text_ids)


def test_resumed_position_gives_identical_batches_and_ranks_are_disjoint(shapes, tokenizer):
    def make(rank=0, world=1):
        return TrainData(
            shapes["train"],
            tokenizer=tokenizer,
            preprocess=PRE,
            batch_size=8,
            rank=rank,
            world_size=world,
            seed=5,
        )

    data = make()
    assert data.batches_per_epoch == 8
    straight = list(itertools.islice(iter(data), 11))  # crosses into epoch 1
    resumed = make()
    resumed.set_position(0, 6)
    for got, want in zip(itertools.islice(iter(resumed), 5), straight[6:], strict=True):
        assert torch.equal(got.index, want.index)
        assert torch.equal(got.images, want.images)  # augmentation included
    assert not torch.equal(straight[0].index, straight[8].index)  # a new permutation
    halves = [set(torch.cat([b.index for b in _one_epoch(make(r, 2))]).tolist()) for r in range(2)]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 64


def test_too_few_pairs_for_a_batch_is_a_clear_error(shapes, tokenizer):
    with pytest.raises(InputDataError, match="fewer than one batch of 100; lower --batch-size"):
        TrainData(shapes["train"], tokenizer=tokenizer, preprocess=PRE, batch_size=100)
