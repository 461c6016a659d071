import json

import pytest
import torch
from safetensors import safe_open

from beit3 import (
    CheckpointError,
    create_config,
    create_model,
    import_official,
    load_checkpoint,
    save_checkpoint,
)
from tests.reference import build_reference


def test_round_trip_is_bit_exact(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(1234)
    original = create_model("beit3-tiny").state_dict()
    loaded = ckpt.model.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert ckpt.model_id.startswith("beit3-tiny@") and len(ckpt.model_id) == len("beit3-tiny@") + 12
    assert ckpt.preprocess.img_size == 32 and ckpt.tokenizer.max_len == 64
    meta = json.loads((tiny_checkpoint / "config.json").read_text())
    assert meta["model_id"] == ckpt.model_id and meta["overrides"] == {}
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        assert f.metadata()["preset"] == "beit3-tiny"
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in f.keys())  # noqa: SIM118


def test_overrides_and_fp16_storage(tmp_path, tokenizer):
    model = create_model("beit3-tiny", img_size=64, drop_path_rate=0.1)
    model_id = save_checkpoint(
        model, tmp_path / "c", preset="beit3-tiny", tokenizer=tokenizer, dtype=torch.float16
    )
    ckpt = load_checkpoint(tmp_path / "c")
    assert ckpt.config.img_size == 64
    assert ckpt.config.drop_path_rate == 0.0  # a run setting, not saved
    assert ckpt.model_id == model_id
    a, b = model.state_dict(), ckpt.model.state_dict()
    assert all(b[k].dtype == torch.float32 for k in b)
    assert all(torch.equal(a[k].half().float(), b[k]) for k in a)


def test_wrapped_model_cannot_be_saved(tmp_path, tokenizer):
    model = torch.nn.DataParallel(create_model("beit3-tiny"))
    with pytest.raises(CheckpointError, match="cannot save"):
        save_checkpoint(model, tmp_path / "c", preset="beit3-tiny", tokenizer=tokenizer)
    assert not (tmp_path / "c").exists()


def test_corrupted_weights_are_detected(tmp_path, tiny_checkpoint):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(bad, verify=False)


def test_config_that_does_not_match_weights_names_the_keys(tmp_path, tiny_checkpoint):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["overrides"] = {"depth": 3, "img_size": 64}
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    message = str(info.value)
    assert "missing (beit3.encoder.layers.2." in message
    assert "shape mismatches (beit3.encoder.embed_positions.A.weight (7, 64) vs (19, 64)" in message
    assert str(bad) in message and "beit3-tiny" in message


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(tmp_path / "empty")


def _official_pth(tmp_path, cfg, extra=None, half=True, wrap="model"):
    """A file in the official format, written from the reference implementation."""
    torch.manual_seed(5)
    ours = create_model("beit3-tiny")
    ref = build_reference(cfg, ours.state_dict())
    state = {k: (v.half() if half else v) for k, v in ref.state_dict().items()}
    state.update(extra or {})
    path = tmp_path / "official.pth"
    torch.save({wrap: state} if wrap else state, path)
    return path, ref


def test_official_pth_converts_with_no_missing_keys_and_same_outputs(tmp_path, spm_path, caplog):
    cfg = create_config("beit3-tiny")
    dim = cfg.embed_dim
    extra = {
        "mim_head.weight": torch.zeros(8192, dim).half(),
        "mim_head.bias": torch.zeros(8192).half(),
    }
    pth, ref = _official_pth(tmp_path, cfg, extra=extra)
    model_id = import_official(pth, tmp_path / "converted", spm=spm_path)
    ckpt = load_checkpoint(tmp_path / "converted")
    assert ckpt.model_id == model_id and ckpt.preset == "beit3-tiny"
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, 200, (2, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    ref = ref.half().float()  # the file is fp16: compare with the same rounded weights
    with torch.no_grad():
        torch.testing.assert_close(
            ckpt.model.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            ckpt.model.encode_text(ids, pad), ref.encode_text(ids, pad), atol=1e-5, rtol=1e-5
        )


def test_official_pth_interpolates_positions_to_a_larger_image(tmp_path, spm_path):
    cfg = create_config("beit3-tiny")
    pth, ref = _official_pth(tmp_path, cfg, half=False, wrap="module")
    import_official(pth, tmp_path / "c64", spm=spm_path, img_size=64)
    ckpt = load_checkpoint(tmp_path / "c64")
    table = ckpt.model.beit3.encoder.embed_positions.A.weight
    old = ref.beit3.encoder.embed_positions.A.weight
    assert table.shape == (3 + 16, cfg.embed_dim)
    assert torch.equal(table[:3], old[:3])  # 2 unused rows and CLS are kept
    grid = old[3:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        grid, size=(4, 4), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(table[3:], expected.permute(0, 2, 3, 1).reshape(16, -1))
    assert ckpt.preprocess.img_size == 64


def test_pretrained_pth_without_heads_gets_fresh_heads(tmp_path, spm_path, caplog):
    cfg = create_config("beit3-tiny")
    pth, _ = _official_pth(tmp_path, cfg)
    state = torch.load(pth, weights_only=True)["model"]
    for key in ("vision_head.weight", "language_head.weight", "logit_scale"):
        del state[key]
    torch.save({"model": state}, pth)
    import_official(pth, tmp_path / "c", spm=spm_path)
    assert "initialised fresh" in caplog.text
    assert load_checkpoint(tmp_path / "c").model.language_head.weight.abs().sum() > 0


def test_bad_official_files_are_clear_errors(tmp_path, spm_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        import_official(junk, tmp_path / "out", spm=spm_path)
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {"beit3.text_embed.weight": torch.zeros(10, 4)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint"):
        import_official(truncated, tmp_path / "out", spm=spm_path)
    import argparse

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        import_official(pickled, tmp_path / "out", spm=spm_path)
    cfg = create_config("beit3-tiny")
    pth, _ = _official_pth(tmp_path, cfg)
    state = torch.load(pth, weights_only=True)["model"]
    # A classification checkpoint has no final LayerNorm and an extra head.
    for key in [k for k in state if k.startswith("beit3.encoder.layer_norm.")]:
        del state[key]
    state["head.weight"] = torch.zeros(1000, cfg.embed_dim)
    torch.save({"model": state}, pth)
    with pytest.raises(CheckpointError) as info:
        import_official(pth, tmp_path / "out", spm=spm_path)
    assert "4 missing (beit3.encoder.layer_norm.A.weight" in str(info.value)
    assert "1 unexpected (head.weight)" in str(info.value)
    assert not (tmp_path / "out").exists()
    other = tmp_path / "other.pth"
    torch.save({"model": {"foo": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="not a BEiT-3 checkpoint"):
        import_official(other, tmp_path / "out", spm=spm_path)


def test_run_settings_are_not_saved_and_architecture_args_are(tmp_path, tokenizer):
    model = create_model(
        "beit3-tiny", "pretraining", drop_path_rate=0.2, use_checkpoint=True, codebook_size=32
    )
    save_checkpoint(model, tmp_path / "p", preset="beit3-tiny", tokenizer=tokenizer)
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    assert meta["overrides"] == {}
    assert meta["architecture_args"] == {"codebook_size": 32}
    ckpt = load_checkpoint(tmp_path / "p", drop_path_rate=0.1)
    assert ckpt.model.mim_head.weight.shape == (32, 64)
    assert ckpt.config.drop_path_rate == 0.1
    retrieval = load_checkpoint(tmp_path / "p", architecture="retrieval")
    assert torch.equal(retrieval.model.beit3.text_embed.weight, model.beit3.text_embed.weight)
