"""One data layer: every command reads a manifest to the same rows and skips, and embeds an image
to the same vector (beit3.data, beit3.transforms.load_image_tensor)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from beit3 import ImageTransform, PreprocessConfig, load_checkpoint, load_image
from beit3.data import list_images
from tests.data import shape_image


def _manifest(tmp_path: Path) -> tuple[Path, list[tuple[str, str]], list[tuple[str, str]]]:
    """A JSONL manifest of three pairs and every kind of bad row; -> (path, pairs, skips)."""
    images = tmp_path / "imgs"
    images.mkdir()
    for color, shape in (("red", "circle"), ("blue", "square"), ("green", "cross")):
        shape_image(color, shape, 32).save(images / f"{color}.png")
    lines = [
        b'{"image": "imgs/red.png", "caption": "a red circle"}',
        b'{"image": "imgs/blue.png", "caption": ["a  blue square"], "license": "cc"}',
        b"not json",
        b'["a list"]',
        b'{"text": "no image here"}',
        b'{"image": "", "caption": "an empty path"}',
        b'{"image": 7, "caption": "a number"}',
        b'{"image": "imgs/green.png", "caption": "gr\xfcn"}',
        b"",
        b'{"image": "imgs/green.png", "caption": "a green cross"}',
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    pairs = [
        (str(images / "red.png"), "a red circle"),
        (str(images / "blue.png"), "a blue square"),
        (str(images / "green.png"), "a green cross"),
    ]
    skips = [
        (f"{path}:3", "invalid JSON (Expecting value)"),
        (f"{path}:4", "expected a JSON object, got list"),
        (f"{path}:5", "no image column 'image'"),
        (f"{path}:6", "empty image path"),
        (f"{path}:7", "column 'image' is int, not a string"),
        (f"{path}:8", "invalid UTF-8 (byte 0xfc at column 43)"),
    ]
    return path, pairs, skips


def _skip_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    caplog.clear()
    return [line for line in lines if line.startswith("skipped ")]


def test_every_entry_point_reads_a_manifest_to_the_same_rows_and_skips(
    tmp_path, tiny_checkpoint, tokenizer, spm_path, caplog, monkeypatch
):
    from beit3.pretrain.data import build_streams
    from indexer import index_images
    from tests.beit3.pretrain.helpers import tiny_config
    from tests.indexer.helpers import rows
    from training import EvalConfig, TrainData, evaluate

    manifest, pairs, skips = _manifest(tmp_path)
    want_lines = [f"skipped {where}: {reason}" for where, reason in skips]
    caplog.set_level(logging.WARNING)
    read: dict[str, list[tuple[str, str]]] = {}
    logged: dict[str, list[str]] = {}

    report = index_images(
        [manifest], tmp_path / "db", tiny_checkpoint, backend="faiss", num_workers=0
    )
    assert report.skipped_reasons == skips
    read["index"] = sorted((r["path"], r["text"]) for r in rows(tmp_path / "db", "images").values())
    logged["index"] = _skip_lines(caplog)

    data = TrainData(
        manifest, tokenizer=tokenizer, preprocess=PreprocessConfig(img_size=32), batch_size=1
    )
    read["finetune"] = [(r.image, r.text) for r in data.dataset.records]
    logged["finetune"] = _skip_lines(caplog)

    seen = {}
    module = importlib.import_module("training.evaluate")  # `training.evaluate` is the function
    real = module.evaluate_model

    def spy(model, tokenizer, preprocess, records, **kwargs):
        seen["records"] = list(records)
        return real(model, tokenizer, preprocess, records, **kwargs)

    monkeypatch.setattr(module, "evaluate_model", spy)
    metrics = evaluate(
        EvalConfig(checkpoint=str(tiny_checkpoint), data=str(manifest), num_workers=0)
    )
    assert (metrics["num_images"], metrics["num_texts"], metrics["skipped_images"]) == (3, 3, 0)
    read["eval"] = [(r.image, r.text) for r in seen["records"]]
    logged["eval"] = _skip_lines(caplog)

    config = tiny_config(
        tmp_path / "run",
        spm_path,
        manifest,
        None,
        text_batch_size=0,
        image_batch_size=0,
        pair_batch_size=1,
    )
    stream = build_streams(config, spm_path, img_size=32, grid_size=2, use_images=True)["pair"]
    read["pretrain"] = [(r.image, r.text) for r in stream.dataset.base.records]
    logged["pretrain"] = _skip_lines(caplog)

    assert list_images(manifest) == [image for image, _ in pairs]  # the visual tokenizer's reader
    logged["pretrain (visual tokenizer)"] = _skip_lines(caplog)

    for entry_point in read:
        assert sorted(read[entry_point]) == sorted(pairs), entry_point
    for entry_point, lines in logged.items():
        assert lines == want_lines, entry_point


def test_eval_index_and_query_embed_a_jpeg_to_the_same_vector(
    tmp_path, tiny_checkpoint, monkeypatch
):
    from indexer import index_images
    from indexer.embed import encode_images, load_query_image
    from tests.indexer.helpers import rows
    from training import EvalConfig, evaluate

    photo = tmp_path / "photo.jpg"
    shape_image("red", "circle", 200).save(photo, quality=90)  # drafted: decoded at 100 x 100
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text('{"image": "photo.jpg", "text": "a red circle"}\n')

    scored = {}
    module = importlib.import_module("training.evaluate")  # `training.evaluate` is the function
    real = module.retrieval_recall

    def spy(image_embeds, *args, **kwargs):
        scored["image"] = image_embeds.detach().cpu().numpy().copy()
        return real(image_embeds, *args, **kwargs)

    monkeypatch.setattr(module, "retrieval_recall", spy)
    evaluate(
        EvalConfig(checkpoint=str(tiny_checkpoint), data=str(manifest), num_workers=0, device="cpu")
    )
    index_images(
        [photo], tmp_path / "db", tiny_checkpoint, backend="faiss", num_workers=0, device="cpu"
    )
    (stored,) = rows(tmp_path / "db", "images").values()

    assert scored["image"].shape == (1, 64) and stored["vector"].dtype == np.float32
    assert np.array_equal(scored["image"][0], stored["vector"])  # bit-identical, not close

    ckpt = load_checkpoint(tiny_checkpoint)
    model, preprocess = ckpt.retrieval_model, ckpt.preprocess
    query = encode_images(model, load_query_image(photo, preprocess)[None], torch.device("cpu"))
    assert np.array_equal(query[0], stored["vector"])
    # The test has teeth: a full-size decode (what eval did before) gives another vector.
    full = ImageTransform(preprocess)(load_image(photo))
    full_vector = encode_images(model, full[None], torch.device("cpu"))[0]
    assert not np.array_equal(full_vector, stored["vector"])
