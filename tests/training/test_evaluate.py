import json

import pytest
import torch

from beit3 import ImageTransform, InputDataError, load_checkpoint, load_image
from tests.data import write_shapes
from tests.training.helpers import run_distributed, write_manifest
from training import EvalConfig, evaluate, evaluate_model, recall_at_k


@pytest.fixture
def eval_set(tmp_path):
    """11 readable images (one with 3 captions), one broken image with 2 captions."""
    pairs = write_shapes(tmp_path / "imgs", size=32)[:11]
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    pairs = [
        *pairs,
        (pairs[0][0], "a red round thing"),
        (pairs[0][0], "red circle"),
        (broken, "a broken image"),
        (broken, "another caption"),
    ]
    return write_manifest(tmp_path / "eval.jsonl", pairs), pairs


def _hand_metrics(ckpt, pairs):
    """Encode the readable images one by one and score with the full matrix."""
    transform = ImageTransform(ckpt.preprocess)
    images = list(dict.fromkeys(p for p, _ in pairs if p.name != "broken.png"))
    texts = [(t, images.index(p)) for p, t in pairs if p.name != "broken.png"]
    with torch.no_grad():
        image_embeds = ckpt.model.encode_image(
            torch.stack([transform(load_image(p)) for p in images])
        )
        batch = ckpt.tokenizer([t for t, _ in texts])
        text_embeds = ckpt.model.encode_text(batch.text_ids, batch.padding_mask)
    return recall_at_k(image_embeds @ text_embeds.T, [i for _, i in texts])


def test_evaluate_matches_hand_computation_and_skips_broken_images(
    eval_set, tiny_checkpoint, tmp_path, caplog
):
    manifest, pairs = eval_set
    got = evaluate(
        EvalConfig(
            checkpoint=str(tiny_checkpoint),
            data=str(manifest),
            output_dir=str(tmp_path / "out"),
            batch_size=4,
            block_size=5,
            num_workers=0,
        )
    )
    ckpt = load_checkpoint(tiny_checkpoint)
    want = _hand_metrics(ckpt, pairs)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert (got["num_images"], got["num_texts"], got["skipped_images"]) == (11, 13, 1)
    assert caplog.text.count("broken.png") == 1
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["model_id"] == ckpt.model_id and saved["i2t_r1"] == got["i2t_r1"]


def test_each_image_is_encoded_once(eval_set, tiny_checkpoint):
    manifest, pairs = eval_set
    ckpt = load_checkpoint(tiny_checkpoint)
    rows = {"image": 0, "text": 0}
    model = ckpt.model
    encode_image, encode_text = model.encode_image, model.encode_text

    def count_image(images):
        rows["image"] += images.shape[0]
        return encode_image(images)

    def count_text(ids, mask=None):
        rows["text"] += ids.shape[0]
        return encode_text(ids, mask)

    model.encode_image, model.encode_text = count_image, count_text
    from beit3.data import read_pairs

    evaluate_model(model, ckpt.tokenizer, ckpt.preprocess, read_pairs(manifest), batch_size=4)
    assert rows == {"image": 11, "text": 15}  # 12 distinct images, one unreadable; 15 captions


def test_nothing_readable_is_an_error(tmp_path, tiny_checkpoint):
    broken = tmp_path / "b.png"
    broken.write_bytes(b"junk")
    manifest = write_manifest(tmp_path / "m.jsonl", [(broken, "a caption")])
    with pytest.raises(InputDataError, match="no readable image with a caption"):
        evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), data=str(manifest), num_workers=0))


def _eval_worker(checkpoint, manifest):
    return evaluate(
        EvalConfig(checkpoint=checkpoint, data=manifest, batch_size=2, num_workers=0, device="cpu")
    )


@pytest.mark.dist
def test_two_process_evaluation_equals_one_process(eval_set, tiny_checkpoint):
    # 12 images / 15 captions split 6+6 / 8+7 with one unreadable image: the official
    # --dist_eval would score each shard alone; gathered first, the numbers must not change.
    manifest, _ = eval_set
    single = _eval_worker(str(tiny_checkpoint), str(manifest))
    ranks = run_distributed(_eval_worker, str(tiny_checkpoint), str(manifest))
    for got in ranks:
        assert got.keys() == single.keys()
        for key, value in single.items():
            assert got[key] == (
                pytest.approx(value, abs=1e-9) if isinstance(value, float) else value
            ), key
