"""The fusion-encoder matcher: hard negatives, calibration measures, training with --itm."""

import json
import math

import pytest
import torch

from beit3 import CheckpointError, ImageTransform, PreprocessConfig, create_model, load_checkpoint
from beit3.data import read_pairs
from tests.data import SHAPES, caption, shape_image
from training import FinetuneConfig, finetune
from training.matching import (
    auroc,
    expected_calibration_error,
    fit_platt,
    matcher_calibration,
    mine_hard_negatives,
    reranked_recall,
)


def _draw(logits_i, logits_t, labels, same_image, same_text, seed=0, rows=None, cols=None):
    rows = torch.arange(logits_i.shape[0]) if rows is None else rows
    cols = torch.arange(logits_i.shape[1]) if cols is None else cols
    return mine_hard_negatives(logits_i, logits_t, labels, same_image, same_text, rows, cols, seed)


def test_negatives_exclude_the_positive_the_same_image_and_duplicate_captions():
    g = 6
    logits = torch.zeros(g, g)
    labels = torch.arange(g)
    same_image = torch.zeros(g, g, dtype=torch.bool)
    same_image[0, 1] = same_image[1, 0] = True  # rows 0 and 1 are two captions of one image
    same_text = torch.eye(g, dtype=torch.bool)
    same_text[2, 3] = same_text[3, 2] = True  # rows 2 and 3 carry the same caption
    for seed in range(50):
        neg_t, neg_i, valid_t, valid_i = _draw(logits, logits, labels, same_image, same_text, seed)
        assert valid_t.all() and valid_i.all()
        assert (neg_t != labels).all() and (neg_i != labels).all()
        assert neg_t[0] != 1 and neg_t[1] != 0 and neg_t[2] != 3 and neg_t[3] != 2


def test_negatives_follow_the_similarities_and_a_rank_draws_as_one_process():
    g = 8
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(g, g, generator=gen) * 3
    labels = torch.arange(g)
    none = torch.zeros(g, g, dtype=torch.bool)
    # A far higher logit wins the softmax draw almost always.
    sharp = logits.clone()
    sharp[torch.arange(g), (labels + 1) % g] = 50.0
    neg_t, _, _, _ = _draw(sharp, sharp, labels, none, none)
    assert neg_t.tolist() == ((labels + 1) % g).tolist()
    # A rank that holds rows 4..7 (labels offset by 4) draws what the full batch draws for
    # them; and a batch dealt in another order (rows keyed by their dataset row) draws the
    # same negatives for the same pairs.
    full = _draw(logits, logits.T, labels, none, none, seed=9)
    part = _draw(logits[4:], logits.T[4:], labels[4:], none[4:], none[4:], seed=9, rows=labels[4:])
    for a, b in zip(full, part, strict=True):
        assert a[4:].tolist() == b.tolist()
    perm = torch.randperm(g, generator=gen)
    back = torch.argsort(perm)
    shuffled = _draw(
        logits[perm][:, perm],
        logits.T[perm][:, perm],
        labels,
        none,
        none,
        seed=9,
        rows=perm,
        cols=perm,
    )
    assert perm[shuffled[0]][back].tolist() == full[0].tolist()  # same text for the same image
    assert perm[shuffled[1]][back].tolist() == full[1].tolist()
    # With no allowed column a row is marked invalid instead of drawing the positive.
    one = _draw(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]), none[:1, :1], none[:1, :1])
    assert not one[2].any() and not one[3].any()


def test_platt_scaling_recovers_a_known_calibration():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, generator=gen) * 2
    labels = torch.bernoulli(torch.sigmoid(0.5 * logits - 1.0), generator=gen)
    scale, bias = fit_platt(logits, labels)
    assert scale == pytest.approx(0.5, abs=0.05) and bias == pytest.approx(-1.0, abs=0.05)
    calibrated = torch.sigmoid(scale * logits + bias)
    assert expected_calibration_error(calibrated, labels) < 0.02
    assert expected_calibration_error(torch.sigmoid(logits), labels) > 0.1


def test_ece_and_auroc_on_hand_made_numbers():
    probs = torch.tensor([0.05, 0.05, 0.95, 0.95])
    labels = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # bin 0: confidence 0.05, accuracy 0.5; bin 9: confidence 0.95, accuracy 1.
    assert expected_calibration_error(probs, labels) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)
    assert auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.85])) == pytest.approx(0.75)
    assert auroc(torch.tensor([0.5]), torch.tensor([0.5])) == pytest.approx(0.5)


def test_a_checkpoint_without_a_matcher_says_how_to_get_one(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="no matcher: fine-tune it with --itm"):
        ckpt.matcher  # noqa: B018


def test_the_matcher_learns_pairs_from_a_joint_forward(tokenizer):
    # 16 fixed (image, caption) pairs against 16 fixed wrong pairings: the fusion encoder must
    # look at image and text together to tell them apart (the images alone repeat, so do the
    # captions).
    torch.manual_seed(0)
    model = create_model(
        "beit3-tiny", "retrieval-itm", vocab_size=tokenizer.vocab_size, drop_path_rate=0.0
    )
    shapes = [(c, s) for c in ("red", "green", "blue", "yellow") for s in SHAPES]
    transform = ImageTransform(PreprocessConfig(img_size=32))
    images = torch.stack([transform(shape_image(c, s, 32)) for c, s in shapes])
    batch = tokenizer([caption(c, s) for c, s in shapes])
    wrong = (torch.arange(16) + 5) % 16
    pixels = torch.cat([images, images])
    ids = torch.cat([batch.text_ids, batch.text_ids[wrong]])
    mask = torch.cat([batch.padding_mask, batch.padding_mask[wrong]])
    targets = torch.cat([torch.ones(16), torch.zeros(16)])
    # (lr 1e-3 without warmup is unstable here: the loss falls, then climbs back to log 2.)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    for _ in range(120):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model.match_logits(pixels, ids, mask), targets
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model.match_logits(pixels, ids, mask)
    assert ((logits > 0).float() == targets).all(), logits
    assert model(images=images[:2], text_ids=ids[:2], padding_mask=mask[:2]).match_logits is None


def test_itm_fine_tuning_trains_and_calibrates_the_matcher(shapes):
    config = FinetuneConfig(
        train=str(shapes["train"]),
        val=str(shapes["eval"]),
        output_dir=str(shapes["root"] / "itm"),
        task="contrastive-itm",
        preset="beit3-tiny",
        spm_vocab_size=300,
        batch_size=32,
        max_steps=40,
        lr=1e-3,
        weight_decay=0.0,
        crop_scale=(0.8, 1.0),
        drop_path_rate=0.0,
        num_workers=0,
        tensorboard=False,
        log_every=10,
        save_every=1000,
        seed=0,
    )
    final = finetune(config)
    records = [json.loads(line) for line in (shapes["root"] / "itm" / "metrics.jsonl").open()]
    itm = [r["loss_itm"] for r in records if "loss_itm" in r]
    contrastive = [r["loss_contrastive"] for r in records if "loss_contrastive" in r]
    # One positive and two hard negatives per pair: BCE starts near log 2 = 0.69 and falls to
    # the prior's 0.64 at least; the contrastive half trains as without the matcher.
    assert itm[0] > 0.6 and itm[-1] < itm[0], itm
    assert contrastive[-1] < 0.5 * contrastive[0], contrastive
    ckpt = load_checkpoint(final)
    assert ckpt.architecture == "retrieval-itm"
    report = json.loads((final / "calibration.json").read_text())
    scale, bias = ckpt.matcher.itm_calibration.tolist()
    assert (scale, bias) == pytest.approx((report["scale"], report["bias"]))
    assert report["ece_calibrated_on_fit_pairs"] <= report["ece_uncalibrated"]
    records = read_pairs(shapes["eval"])
    metrics = reranked_recall(ckpt.matcher, ckpt.tokenizer, ckpt.preprocess, records, rerank=8)
    calibration, probs, labels = matcher_calibration(
        ckpt.matcher, ckpt.tokenizer, ckpt.preprocess, records
    )
    assert 0.0 <= calibration["auroc"] <= 1.0 and math.isfinite(calibration["ece"])
    assert probs.shape == labels.shape and int(labels.sum()) == 32
    # The dual encoder still works: it is the same checkpoint, with the matcher beside it.
    assert metrics["i2t_r5"] > 0.5 and metrics["t2i_r5"] > 0.5, metrics


def _pairs(tokenizer, n=4, size=32):
    transform = ImageTransform(PreprocessConfig(img_size=size))
    shapes = [(c, s) for c in ("red", "blue") for s in SHAPES][:n]
    images = torch.stack([transform(shape_image(c, s, size)) for c, s in shapes])
    batch = tokenizer([caption(c, s) for c, s in shapes])
    return images, batch.text_ids, batch.padding_mask


def test_late_fusion_over_every_layer_is_the_joint_forward(tokenizer):
    # fusion_layers = depth: no layer runs apart, the matcher's copies of all layers run over
    # the joint sequence: the same computation as the backbone's own joint forward
    # (fusion_layers = 0, checkpoints from before the fusion layers existed).
    torch.manual_seed(0)
    kw = {"vocab_size": tokenizer.vocab_size, "depth": 3}
    joint = create_model("beit3-tiny", "retrieval-itm", fusion_layers=0, **kw).eval()
    late = create_model("beit3-tiny", "retrieval-itm", fusion_layers=3, **kw).eval()
    state = {k: v for k, v in joint.state_dict().items()}
    missing, unexpected = late.load_state_dict(state, strict=False)
    assert all(k.startswith("itm_fusion.") for k in missing) and not unexpected
    late.init_matcher()  # fusion layers copied from the backbone ...
    late.itm_head.load_state_dict(joint.itm_head.state_dict())  # ... and the same head
    images, ids, mask = _pairs(tokenizer)
    with torch.no_grad():
        expected = joint.match_logits(images, ids, mask)
        got = late.match_logits(images, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # With 2 of 3 layers fused, the first runs apart: another (still finite) function.
    two = create_model("beit3-tiny", "retrieval-itm", fusion_layers=2, **kw).eval()
    two.load_state_dict({**state, **{k: v for k, v in two.state_dict().items() if "fusion" in k}})
    with torch.no_grad():
        other = two.match_logits(images, ids, mask)
    assert torch.isfinite(other).all() and not torch.allclose(other, expected, atol=1e-4)


def test_a_dual_encoder_gains_a_matcher_made_from_its_top_layers(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint, architecture="retrieval-itm")
    model = ckpt.model
    assert model.fusion_layers == 2 and ckpt.architecture == "retrieval-itm"
    top = model.beit3.encoder.layers[-2:]
    for own, source in zip(model.itm_fusion.layers, top, strict=True):
        for (name, a), (_, b) in zip(
            own.state_dict().items(), source.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    # Saved and loaded again: its fusion layers are its own (config.json names how many).
    from beit3 import save_checkpoint

    save_checkpoint(model, tmp_path / "m", preset=ckpt.preset, tokenizer=ckpt.tokenizer)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture_args"] == {"fusion_layers": 2}
    again = load_checkpoint(tmp_path / "m")
    assert again.model.fusion_layers == 2


def test_a_matcher_saved_before_fusion_layers_existed_still_loads(tokenizer, tmp_path):
    from beit3 import save_checkpoint

    torch.manual_seed(0)
    old = create_model("beit3-tiny", "retrieval-itm", fusion_layers=0)
    save_checkpoint(old, tmp_path / "old", preset="beit3-tiny", tokenizer=tokenizer)
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config["architecture_args"] = {}  # as the code before fusion layers wrote it
    config_path.write_text(json.dumps(config))
    ckpt = load_checkpoint(tmp_path / "old")
    assert ckpt.model.fusion_layers == 0 and ckpt.model.itm_fusion is None
    images, ids, mask = _pairs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            ckpt.matcher.match_logits(images, ids, mask), old.eval().match_logits(images, ids, mask)
        )


def test_the_matcher_parts_take_the_head_learning_rate():
    from beit3.run.optim import layer_id

    assert layer_id("itm_fusion.layers.0.self_attn.q_proj.A.weight", 6) == 7
    assert layer_id("itm_head.dense.weight", 6) == 7
    assert layer_id("beit3.encoder.layers.0.self_attn.q_proj.A.weight", 6) == 1


def test_matcher_only_training_leaves_the_dual_encoder_untouched(shapes, tiny_checkpoint):
    # contrastive_weight 0: only itm_* weights change; negatives follow the temperature
    # schedule from 8 to 2.
    before = load_checkpoint(tiny_checkpoint).model.state_dict()
    config = FinetuneConfig(
        train=str(shapes["train"]),
        output_dir=str(shapes["root"] / "matcher-only"),
        init=str(tiny_checkpoint),
        task="contrastive-itm",
        task_options={"itm_temperature": 8.0, "itm_temperature_end": 2.0, "contrastive_weight": 0},
        batch_size=16,
        max_steps=5,
        lr=1e-3,
        warmup_steps=1,
        num_workers=0,
        tensorboard=False,
        log_every=1,
        save_every=1000,
        seed=0,
    )
    after = load_checkpoint(finetune(config)).model.state_dict()
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    new = {k for k in after if k not in before}
    assert changed == set() and new and all(k.startswith("itm_") for k in new), changed
    fresh = load_checkpoint(tiny_checkpoint, architecture="retrieval-itm").model.state_dict()
    assert any(not torch.equal(after[k], fresh[k]) for k in new if k.startswith("itm_head"))
    records = [
        json.loads(line) for line in (shapes["root"] / "matcher-only" / "metrics.jsonl").open()
    ]
    temperatures = [r["itm_temperature"] for r in records if "itm_temperature" in r]
    assert temperatures[0] == pytest.approx(8.0) and temperatures[-1] == pytest.approx(2.0 + 6 / 5)


def test_the_matching_task_sets_the_fusion_depth_and_its_starting_layers(
    tokenizer, tiny_checkpoint, tmp_path
):
    from beit3 import ConfigError, save_checkpoint
    from beit3.run import DistInfo
    from training.tasks import MatchingTask

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    task = MatchingTask(info, fusion_layers=1, fusion_init=str(tiny_checkpoint))
    assert task.architecture_args == {"fusion_layers": 1}
    torch.manual_seed(5)
    model = create_model("beit3-tiny", "retrieval-itm", fusion_layers=1)
    task.prepare(model)  # the fusion layer is now the other checkpoint's top layer
    source = load_checkpoint(tiny_checkpoint).model.beit3.encoder
    own = model.itm_fusion
    for key, value in own.layers[0].state_dict().items():
        assert torch.equal(value, source.layers[-1].state_dict()[key]), key
    for key, value in own.layer_norm.state_dict().items():
        assert torch.equal(value, source.layer_norm.state_dict()[key]), key
    assert not torch.equal(  # and not the model's own top layer
        own.layers[0].self_attn.q_proj.A.weight,
        model.beit3.encoder.layers[-1].self_attn.q_proj.A.weight,
    )
    with pytest.raises(ConfigError, match="fusion_layers must be a whole number"):
        MatchingTask(info, fusion_layers=1.5)
    wide = create_model("beit3-tiny", embed_dim=32, num_heads=4)
    save_checkpoint(wide, tmp_path / "wide", preset="beit3-tiny", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="width 32, the model's is 64"):
        MatchingTask(info, fusion_init=str(tmp_path / "wide")).prepare(model)
