import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from beit3 import load_checkpoint
from beit3.errors import ConfigError
from beit3.pretrain.config import PretrainConfig
from beit3.pretrain.data import build_streams
from beit3.pretrain.loss import masked_cross_entropy
from beit3.pretrain.train import load_pretrained, pretrain
from beit3.pretrain.vqkd import load_vqkd
from beit3.tokenizer import BOS_ID, EOS_ID, TextTokenizer
from beit3.transforms import ImageTransform, PreprocessConfig, load_image
from tests.beit3.pretrain.helpers import read_metrics, tiny_config


def _majority_baselines(manifest, spm, vqkd_path) -> tuple[float, float]:
    """Accuracy of always predicting the most frequent masked text token / visual code."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    tok = TextTokenizer(spm)
    pieces = Counter(i for r in rows for i in tok.encode(r["text"]) if i not in (BOS_ID, EOS_ID))
    vqkd = load_vqkd(vqkd_path)
    transform = ImageTransform(PreprocessConfig(img_size=32))
    images = torch.stack([transform(load_image(r["image"])) for r in rows])
    codes = Counter(vqkd.encode(images).reshape(-1).tolist())
    return (max(pieces.values()) / sum(pieces.values()), max(codes.values()) / sum(codes.values()))


def test_smoke_run_writes_config_metrics_and_a_finetunable_checkpoint(
    tmp_path, spm_path, shapes_manifest, vqkd_dir
):
    config = tiny_config(tmp_path / "run", spm_path, shapes_manifest, vqkd_dir, tensorboard=True)
    result = pretrain(config)
    assert result.steps == 2
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["config"]["max_steps"] == 2 and len(run_config["git_sha"]) >= 7
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    for key in (
        "loss",
        "loss_text_mlm",
        "acc_image_mim",
        "loss_pair_mlm",
        "acc_pair_mim",
        "codebook_usage",
        "tokens_per_s",
        "lr",
        "grad_norm",
    ):
        assert key in records[-1], key
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    # Fine-tuning starts from the final directory: the backbone moves to the retrieval model.
    pretrained = load_checkpoint(result.checkpoint, architecture="retrieval")
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=True
    )
    assert state["step"] == 2 and set(state["extra"]["streams"]) == {"text", "image", "pair"}
    from safetensors.torch import load_file

    final = load_file(str(result.checkpoint / "model.safetensors"))
    assert "mim_head.weight" in final and final["mim_head.weight"].shape[0] == 32
    for key, value in pretrained.model.beit3.state_dict().items():
        assert torch.equal(value, final["beit3." + key]), key


def test_tiny_pretraining_learns_all_three_kinds(tmp_path, spm_path, shapes_manifest, vqkd_dir):
    text_base, code_base = _majority_baselines(shapes_manifest, spm_path, vqkd_dir)
    config = tiny_config(
        tmp_path / "run",
        spm_path,
        shapes_manifest,
        vqkd_dir,
        max_steps=120,
        text_batch_size=32,
        image_batch_size=32,
        pair_batch_size=32,
        log_every=20,
    )
    pretrain(config)
    records = read_metrics(tmp_path / "run")
    first, last = records[0], records[-1]
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    for part in ("text_mlm", "image_mim", "pair_mlm", "pair_mim"):
        assert last[f"loss_{part}"] < first[f"loss_{part}"], part
    # Masked accuracy well above always guessing the most frequent target.
    assert last["acc_pair_mlm"] > text_base + 0.3, (last["acc_pair_mlm"], text_base)
    assert last["acc_text_mlm"] > text_base + 0.2, (last["acc_text_mlm"], text_base)
    assert last["acc_image_mim"] > code_base + 0.15, (last["acc_image_mim"], code_base)
    assert last["acc_pair_mim"] > code_base + 0.15, (last["acc_pair_mim"], code_base)
    # The pair MLM reads the image: with another pair's image its accuracy drops.
    model = load_pretrained(tmp_path / "run" / "final")
    stream = build_streams(config, spm_path, img_size=32, grid_size=2, use_images=True)["pair"]
    right = wrong = 0.0
    with torch.no_grad():
        for _ in range(4):
            b = next(stream)
            for images, score in ((b.images, 1), (b.images.roll(1, 0), -1)):
                logits = model(
                    images, b.text_ids, b.padding_mask, None, b.text_positions
                ).mlm_logits
                stats = masked_cross_entropy(logits, b.text_targets)
                acc = (stats.correct / stats.count).item()
                right, wrong = (right + acc, wrong) if score == 1 else (right, wrong + acc)
    assert right / 4 > wrong / 4 + 0.15, (right / 4, wrong / 4)


def test_resume_continues_the_same_curve(tmp_path, spm_path, shapes_manifest, vqkd_dir):
    # Drop path on: the resumed run must also continue each rank's random stream.
    common = {"max_steps": 6, "save_every": 3, "log_every": 1, "drop_path_rate": 0.2}
    straight = tiny_config(tmp_path / "a", spm_path, shapes_manifest, vqkd_dir, **common)
    pretrain(straight)

    def stop_at_3(step, total):
        if step == 3:
            raise KeyboardInterrupt

    interrupted = tiny_config(tmp_path / "b", spm_path, shapes_manifest, vqkd_dir, **common)
    with pytest.raises(KeyboardInterrupt):
        pretrain(interrupted, progress=stop_at_3)
    pretrain(interrupted.replace(resume="latest"))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss_text_mlm", "loss_image_mim", "loss_pair_mlm", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    fa = torch.load(
        tmp_path / "a" / "checkpoints" / "step-00000006" / "trainer_state.pt", weights_only=True
    )
    fb = torch.load(
        tmp_path / "b" / "checkpoints" / "step-00000006" / "trainer_state.pt", weights_only=True
    )
    assert fa["extra"]["streams"] == fb["extra"]["streams"]  # same data positions
    assert torch.equal(fa["rank_rng"][0]["cpu"], fb["rank_rng"][0]["cpu"])


def test_a_finished_run_is_not_overwritten_by_a_fresh_one(
    tmp_path, spm_path, shapes_manifest, vqkd_dir
):
    config = tiny_config(tmp_path, spm_path, shapes_manifest, vqkd_dir, max_steps=2, save_every=2)
    pretrain(config)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run .* --resume latest"):
        pretrain(config)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_images_without_a_visual_tokenizer_are_refused(tmp_path, spm_path, shapes_manifest):
    config = tiny_config(tmp_path, spm_path, shapes_manifest, None)
    with pytest.raises(ConfigError, match="visual tokenizer"):
        pretrain(config)


def test_text_only_pretraining_needs_no_visual_tokenizer(tmp_path, spm_path, shapes_manifest):
    texts = tmp_path / "texts.txt"
    texts.write_text(
        "\n".join(f"a {c} thing number {i}" for i in range(40) for c in ("red", "blue")) + "\n"
    )
    config = tiny_config(
        tmp_path / "run",
        spm_path,
        shapes_manifest,
        None,
        pair_data=(),
        text_data=(str(texts),),
        image_batch_size=0,
        pair_batch_size=0,
    )
    result = pretrain(config)
    assert set(read_metrics(tmp_path / "run")[-1]) >= {"loss_text_mlm", "acc_text_mlm"}
    assert "loss_pair_mlm" not in read_metrics(tmp_path / "run")[-1]
    assert result.checkpoint.is_dir()


def test_tokenizer_grid_must_match_the_model(tmp_path, spm_path, shapes_manifest, vqkd_dir):
    config = tiny_config(
        tmp_path, spm_path, shapes_manifest, vqkd_dir, model_overrides={"img_size": 64}
    )
    with pytest.raises(ConfigError, match="grid"):
        pretrain(config)


def test_config_rejects_typos_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'text_mask_ratio'"):
        PretrainConfig.from_dict(
            {"output_dir": str(tmp_path), "pair_data": ["x"], "text_mask_ratoi": 0.2}
        )
    with pytest.raises(ConfigError, match="image_mask_ratio"):
        PretrainConfig(output_dir=str(tmp_path), pair_data=("x",), image_mask_ratio=1.5)
    with pytest.raises(ConfigError, match="no training data"):
        PretrainConfig(output_dir=str(tmp_path))


def test_masks_depend_on_the_sample_not_the_batch(tmp_path, spm_path, shapes_manifest):
    config = tiny_config(tmp_path, spm_path, shapes_manifest, None, pair_batch_size=8)
    one = build_streams(config, spm_path, img_size=32, grid_size=2, use_images=True)["pair"]
    halves = [
        build_streams(
            config.replace(pair_batch_size=4),
            spm_path,
            img_size=32,
            grid_size=2,
            use_images=True,
            rank=r,
            world_size=2,
        )["pair"]
        for r in range(2)
    ]
    big = next(one)
    parts = [next(h) for h in halves]
    by_index = {int(i): row for row, i in enumerate(big.index)}
    for part in parts:
        for row, index in enumerate(part.index.tolist()):
            ref = by_index[index]
            assert torch.equal(part.images[row], big.images[ref])
            assert torch.equal(part.image_mask[row], big.image_mask[ref])
            length = int((~part.padding_mask[row]).sum())
            assert torch.equal(part.text_ids[row, :length], big.text_ids[ref, :length])
    assert np.isclose(big.image_mask.float().mean().item(), 0.5)  # round(0.4 * 4) = 2 of 4


def test_webdataset_shards_and_image_folders_feed_the_streams(
    tmp_path, spm_path, shapes_manifest, vqkd_dir
):
    import io
    import tarfile

    rows = [json.loads(line) for line in shapes_manifest.read_text().splitlines()]
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, row in enumerate(rows):
            for name, data in (
                (f"{i:05d}.png", Path(row["image"]).read_bytes()),
                (f"{i:05d}.txt", row["text"].encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    images = tmp_path / "images"
    images.mkdir()
    for row in rows[:40]:
        (images / Path(row["image"]).name).write_bytes(Path(row["image"]).read_bytes())
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(r["text"] for r in rows) + "\n")
    config = tiny_config(
        tmp_path / "run",
        spm_path,
        shapes_manifest,
        vqkd_dir,
        max_steps=3,
        pair_data=(str(shard),),
        image_data=(str(images),),
        text_data=(str(texts),),
        save_every=2,
    )
    pretrain(config)
    last = read_metrics(tmp_path / "run")[-1]
    assert {"loss_text_mlm", "loss_image_mim", "loss_pair_mlm", "loss_pair_mim"} <= set(last)
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=True
    )
    assert state["extra"]["streams"]["pair"] == {"epoch": 0, "position": 48}
    # Resuming a streamed run skips the samples it already used.
    pretrain(
        config.replace(max_steps=4, resume=str(tmp_path / "run" / "checkpoints" / "step-00000002"))
    )
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-2:] == [3, 4]


def test_worker_processes_give_the_same_batches_across_epochs(tmp_path, spm_path, shapes_manifest):
    config = tiny_config(tmp_path, spm_path, shapes_manifest, None, pair_batch_size=32)
    draws = []
    for workers in (0, 2):
        stream = build_streams(
            config.replace(num_workers=workers), spm_path, img_size=32, grid_size=2, use_images=True
        )["pair"]
        draws.append([next(stream) for _ in range(6)])  # 4 batches per epoch: crosses one
        assert stream.state_dict() == {"epoch": 1, "position": 64}
    for a, b in zip(*draws, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
        assert torch.equal(a.text_ids, b.text_ids) and torch.equal(a.image_mask, b.image_mask)
    assert not torch.equal(draws[0][0].index, draws[0][4].index)  # epoch 1 reshuffles
