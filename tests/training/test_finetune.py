import json

import pytest
import torch
from safetensors.torch import load_file

from beit3 import CheckpointError, ConfigError, InputDataError, load_checkpoint
from beit3.run import find_latest
from training import EvalConfig, FinetuneConfig, evaluate, finetune


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _scratch(shapes, name, **changes):
    base = dict(
        train=str(shapes["train"]),
        output_dir=str(shapes["root"] / name),
        preset="beit3-tiny",
        spm_vocab_size=300,
        batch_size=16,
        num_workers=0,
        tensorboard=False,
        log_every=1,
        drop_path_rate=0.0,
    )
    return FinetuneConfig(**{**base, **changes})


def test_tiny_model_overfits_64_pairs(shapes):
    # Full-batch contrastive steps on the 64 shape pairs; lr / steps / crop were picked by
    # trying seeds 0-5 (R@1 >= 0.94 for each; 50 steps or lr 2e-3 were unreliable).
    config = _scratch(
        shapes,
        "overfit",
        batch_size=64,
        max_steps=100,
        lr=1e-3,
        weight_decay=0.0,
        crop_scale=(0.8, 1.0),
        log_every=50,
        save_every=1000,
        seed=0,
    )
    final = finetune(config)
    resolved = json.loads((shapes["root"] / "overfit" / "run_config.json").read_text())
    assert resolved["config"]["grad_clip"] == 0.3  # from scratch: clipped by default
    losses = _losses(shapes["root"] / "overfit")
    # The two jitter variants share a caption, so log(2) ~ 0.69 is the floor of the loss.
    assert losses[50] < 1.5 and losses[100] < losses[50]
    metrics = evaluate(EvalConfig(checkpoint=str(final), data=str(shapes["eval"]), num_workers=0))
    assert metrics["num_images"] == metrics["num_texts"] == 32
    assert metrics["i2t_r1"] >= 0.9 and metrics["t2i_r1"] >= 0.9, metrics


class _Stop(Exception):
    pass


def test_resume_after_a_stop_continues_the_same_steps_and_losses(shapes):
    # drop path on, several batches per epoch and an epoch boundary: RNG, data position,
    # optimizer and schedule must all carry over.
    common = dict(max_steps=6, save_every=3, lr=1e-3, drop_path_rate=0.1, seed=3)
    straight = finetune(_scratch(shapes, "straight", **common))

    def stop_at_5(step, total):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(_scratch(shapes, "stopped", **common), progress=stop_at_5)
    assert find_latest(shapes["root"] / "stopped").name == "step-00000003"
    with pytest.raises(ConfigError, match="already holds a run .* --resume latest"):
        finetune(_scratch(shapes, "stopped", **common))
    resumed = finetune(_scratch(shapes, "stopped", resume="latest", **common))

    want, got = _losses(shapes["root"] / "straight"), _losses(shapes["root"] / "stopped")
    assert list(got) == list(want) == [1, 2, 3, 4, 5, 6]  # no step twice, none missing
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    a, b = (
        load_file(str(straight / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="batch_size"):
        finetune(_scratch(shapes, "stopped", resume="latest", **{**common, "batch_size": 8}))


def test_finetune_from_checkpoint_with_validation_accumulation_and_checkpointing(
    shapes, tiny_checkpoint
):
    run = shapes["root"] / "from_ckpt"
    config = FinetuneConfig(
        train=str(shapes["train"]),
        output_dir=str(run),
        init=str(tiny_checkpoint),
        val=str(shapes["eval"]),
        eval_every=2,
        max_steps=4,
        batch_size=8,
        accum_steps=2,
        use_checkpoint=True,
        num_workers=0,
        log_every=2,
        tensorboard=True,
    )
    final = finetune(config)
    records = _records(run)
    evals = [r for r in records if "val/average" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["val/i2t_r1"] <= 1 for r in evals)
    best = json.loads((run / "best.json").read_text())
    assert best["average"] == max(r["val/average"] for r in evals)
    assert load_checkpoint(run / "best").model_id != load_checkpoint(tiny_checkpoint).model_id
    # The final checkpoint is a plain, loadable model without the training-only knobs.
    ckpt = load_checkpoint(final)
    assert ckpt.config == load_checkpoint(tiny_checkpoint).config
    assert not ckpt.config.use_checkpoint and ckpt.config.drop_path_rate == 0.0
    resolved = json.loads((run / "run_config.json").read_text())
    assert resolved["config"]["layer_decay"] == 0.65 and resolved["config"]["warmup_steps"] == 1
    assert resolved["config"]["grad_clip"] == 0.0  # from a checkpoint: no clipping
    assert resolved["git_sha"] and resolved["config"]["global_batch_size"] == 8
    assert any((run / "tensorboard").iterdir())
    # Layer decay reached the optimizer: 2 layers, so embeddings train at 0.65^3 x lr.
    state = torch.load(
        run / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=True
    )
    scales = sorted({round(g["lr_scale"], 6) for g in state["optimizer"]["param_groups"]})
    assert scales == [round(0.65**k, 6) for k in (3, 2, 1, 0)]


def test_from_scratch_trains_its_own_tokenizer_and_smoke_mode_is_fast(shapes):
    final = finetune(_scratch(shapes, "smoke", max_steps=2, temperature=0.02, grad_clip=1e-3))
    # The gradient norm is logged before clipping (a tiny clip leaves it as it was).
    norms = [r["grad_norm"] for r in _records(shapes["root"] / "smoke") if "grad_norm" in r]
    assert len(norms) == 2 and all(n > 1e-2 for n in norms), norms
    # The contrastive scale starts at 1 / 0.02 (not the default 1 / 0.07) and Adam moves its log
    # by at most about lr (1e-4) a step.
    scales = [r["logit_scale"] for r in _records(shapes["root"] / "smoke") if "logit_scale" in r]
    assert scales and all(abs(s - 50.0) < 0.1 for s in scales), scales
    ckpt = load_checkpoint(final)
    assert ckpt.config.vocab_size == ckpt.tokenizer.vocab_size < 400
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("a red circle")) == "a red circle"
    assert list(_losses(shapes["root"] / "smoke")) == [1, 2]


def test_bad_settings_are_named(shapes, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of init"):
        FinetuneConfig(train="x", output_dir="y")
    with pytest.raises(
        ConfigError, match="shards have no known length; give the run length with --max-steps"
    ):
        finetune(_scratch(shapes, "shards", train=str(tmp_path / "s-{0..1}.tar")))
    with pytest.raises(InputDataError, match="no such file or folder"):
        finetune(_scratch(shapes, "missing", train=str(tmp_path / "nope.jsonl"), max_steps=1))
    with pytest.raises(ConfigError, match="grad_clip must be >= 0"):
        _scratch(shapes, "clip", grad_clip=-1.0)
    with pytest.raises(ConfigError, match=r"betas must be in \[0, 1\)"):
        _scratch(shapes, "betas", betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match=r"temperature must be in \(0, 1\], got 0"):
        _scratch(shapes, "cold", temperature=0.0)
    with pytest.raises(ConfigError, match="bf16 needs a CUDA device"):
        finetune(_scratch(shapes, "bf16", precision="bf16", device="cpu", max_steps=1))


def test_finetune_starts_from_a_pretraining_checkpoint(shapes, tokenizer):
    from beit3 import create_model, save_checkpoint

    pretrained = create_model("beit3-tiny", architecture="pretraining", vocab_size=400)
    path = shapes["root"] / "pretrained"
    model_id = save_checkpoint(pretrained, path, preset="beit3-tiny", tokenizer=tokenizer)
    run = shapes["root"] / "from_pretraining"
    final = finetune(
        FinetuneConfig(
            train=str(shapes["train"]),
            output_dir=str(run),
            init=str(path),
            max_steps=1,
            batch_size=8,
            num_workers=0,
            tensorboard=False,
        )
    )
    ckpt = load_checkpoint(final)
    assert ckpt.architecture == "retrieval" and ckpt.config.vocab_size == 400
    assert json.loads((run / "run_config.json").read_text())["config"]["init_model_id"] == model_id
    # The backbone came over (one small step moves it only slightly); the heads are new.
    before = pretrained.beit3.text_embed.weight
    after = ckpt.model.beit3.text_embed.weight
    assert (after - before).abs().max() < 1e-3


def test_finetune_a_checkpoint_at_a_larger_image_size(shapes, tiny_checkpoint):
    # beit3-tiny is 32 px in 16 px patches (2 x 2); at 48 px its grid is 3 x 3.
    from beit3.checkpoint import interpolate_vision_positions

    run = shapes["root"] / "at48"
    final = finetune(
        FinetuneConfig(
            train=str(shapes["train"]),
            output_dir=str(run),
            init=str(tiny_checkpoint),
            img_size=48,
            max_steps=1,
            lr=1e-12,  # Adam moves each weight by ~lr: the resized table is compared below
            min_lr=0.0,
            batch_size=8,
            num_workers=0,
            tensorboard=False,
        )
    )
    ckpt = load_checkpoint(final)
    assert ckpt.config.img_size == ckpt.preprocess.img_size == 48
    key = "beit3.encoder.embed_positions.A.weight"
    table = load_file(str(final / "model.safetensors"))[key]
    source = load_file(str(tiny_checkpoint / "model.safetensors"))[key]
    assert table.shape == (3 + 9, source.shape[1])
    torch.testing.assert_close(table, interpolate_vision_positions(source, 9), rtol=0, atol=1e-6)
    assert json.loads((run / "run_config.json").read_text())["config"]["img_size"] == 48
    with pytest.raises(CheckpointError, match="img_size 40 is not a multiple of patch_size 16"):
        load_checkpoint(tiny_checkpoint, img_size=40)
