import json

import pytest
import torch
import torch.nn.functional as F

from beit3.errors import CheckpointError, ConfigError, UnknownPresetError
from beit3.pretrain.teachers import PixelTeacher
from beit3.pretrain.vqkd import (
    VQKD,
    NormEMAQuantizer,
    get_vqkd_preset,
    import_official_vqkd,
    load_vqkd,
    save_vqkd,
)
from tests.beit3.pretrain.helpers import read_metrics


def _ready_tiny(seed: int = 0, **overrides) -> VQKD:
    torch.manual_seed(seed)
    model = VQKD(get_vqkd_preset("vqkd-tiny", **overrides))
    size = model.config.img_size
    model.quantize.kmeans_init_(model.encode_vectors(torch.randn(16, 3, size, size)).detach())
    return model.eval()


def test_encode_gives_one_code_per_patch():
    model = _ready_tiny(img_size=64)
    images = torch.randn(3, 3, 64, 64)
    codes = model.encode(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    assert torch.equal(codes, model.encode(images))  # deterministic
    with pytest.raises(ConfigError, match="img_size"):
        model.encode(torch.randn(1, 3, 32, 32))


def test_codebook_usage_after_short_training_on_shapes(vqkd_dir):
    # The fixture trains vqkd-tiny (32 codes) for 60 steps on the shapes with the pixel teacher.
    records = read_metrics(vqkd_dir.parent)
    first, last = records[0], records[-1]
    assert last["codebook_usage"] >= 0.6, last  # at least 20 of 32 codes in the last window
    assert last["codebook_perplexity"] > 10
    assert last["codes_reseeded"] > 0  # codes unused for 20 steps were re-seeded
    assert last["rec_loss"] < 0.6 * first["rec_loss"]
    model = load_vqkd(vqkd_dir)
    assert model.quantize.is_initialized
    norms = model.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = _ready_tiny()
    save_vqkd(model, tmp_path / "tok", teacher="pixels")
    loaded = load_vqkd(tmp_path / "tok")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["teacher"] == "pixels"


def test_untrained_codebook_is_refused_at_load(tmp_path):
    save_vqkd(VQKD(get_vqkd_preset("vqkd-tiny")), tmp_path / "raw")
    with pytest.raises(CheckpointError, match="never initialised"):
        load_vqkd(tmp_path / "raw")


def test_official_beit_v2_key_names_import(tmp_path):
    # A released file is a dict under "model" with the tokenizer keys plus the teacher, the
    # scaling layer and EmbeddingEMA's unused copies. Our names must be the official ones.
    model = _ready_tiny()
    state = dict(model.state_dict())
    for key in (
        "encoder.blocks.0.attn.qkv.weight",
        "encoder.blocks.0.attn.q_bias",
        "encoder.fc_norm.weight",
        "decoder.patch_embed.proj.weight",
        "quantize.embedding.weight",
        "quantize.cluster_size",
        "encode_task_layer.2.weight",
        "decode_task_layer.0.bias",
    ):
        assert key in state, key
    official = {k: v.half() for k, v in state.items()}
    official["teacher_model.visual.proj"] = torch.zeros(4, 4)
    official["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    official["quantize.embedding.embed_avg"] = torch.zeros(64, 16)
    official["quantize.embedding.cluster_size"] = torch.zeros(64)
    torch.save({"model": official}, tmp_path / "vqkd.pth")
    import_official_vqkd(tmp_path / "vqkd.pth", tmp_path / "out", preset="vqkd-tiny")
    loaded = load_vqkd(tmp_path / "out")
    images = torch.randn(4, 3, 32, 32)
    half = _ready_tiny()
    half.load_state_dict({k: v.half().float() for k, v in state.items()})
    assert torch.equal(loaded.encode(images), half.encode(images))


def test_quantizer_ema_moves_codes_to_their_means_and_sums_like_one_batch():
    torch.manual_seed(0)
    q = NormEMAQuantizer(8, 4, decay=0.5)
    q.kmeans_init_(torch.randn(64, 4))
    z = F.normalize(torch.randn(2, 10, 4), dim=-1)
    _, codes, commit, z_norm = q(z)
    assert commit.item() > 0 and codes.shape == (2, 10)
    # Statistics of two halves, summed (what all_reduce does), equal those of the whole batch.
    whole = q.batch_stats(z_norm, codes)
    halves = [q.batch_stats(z_norm[i : i + 1], codes[i : i + 1]) for i in range(2)]
    assert torch.allclose(whole[0], halves[0][0] + halves[1][0])
    assert torch.allclose(whole[1], halves[0][1] + halves[1][1])
    code = int(codes[0, 0])
    mean = F.normalize(z_norm[codes == code].mean(0), dim=0)
    before = F.cosine_similarity(q.embedding.weight[code], mean, dim=0)
    q.ema_update(*whole)
    after = F.cosine_similarity(q.embedding.weight[code], mean, dim=0)
    assert after > before
    norms = q.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_dead_codes_are_reseeded_from_the_batch():
    torch.manual_seed(0)
    q = NormEMAQuantizer(8, 4)
    q.kmeans_init_(torch.randn(64, 4))
    before = q.embedding.weight.clone()
    counts = torch.tensor([5.0, 0, 5, 0, 5, 5, 5, 0])  # vectors per code since the last check
    samples = F.normalize(torch.randn(32, 4), dim=-1)
    assert q.reseed_dead_codes_(samples, counts) == 3
    for code in (1, 3, 7):  # each re-seeded code is one of the samples
        assert (samples @ q.embedding.weight[code]).max() > 1 - 1e-5
    assert torch.equal(q.embedding.weight[counts > 0], before[counts > 0])


def test_pixel_teacher_orders_patches_like_the_patch_embedding():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = PixelTeacher(16)(images)
    assert out.shape == (2, 4, 768)
    assert torch.equal(out[1, 2].reshape(3, 16, 16), images[1, :, 16:, :16])  # row-major
    normed = PixelTeacher(16, "patch")(torch.randn(1, 3, 32, 32))
    assert torch.allclose(normed.mean(-1), torch.zeros(1, 4), atol=1e-5)


def test_presets_and_config_errors():
    assert get_vqkd_preset("vqkd-base").codebook_size == 8192
    assert get_vqkd_preset("vqkd-base").codebook_dim == 32
    with pytest.raises(UnknownPresetError, match="vqkd-tiny"):
        get_vqkd_preset("vqkd-tiyn")
    with pytest.raises(ConfigError, match="did you mean 'codebook_size'"):
        get_vqkd_preset("vqkd-tiny", codebok_size=8)
    with torch.device("meta"):
        base = VQKD(get_vqkd_preset("vqkd-base"))
    assert 94e6 < sum(p.numel() for p in base.parameters()) < 96e6  # ViT-B + 1-layer decoder


def test_a_beit3_checkpoint_can_be_the_teacher(tmp_path, tiny_checkpoint, shapes_manifest):
    from beit3.pretrain.config import VisualTokenizerConfig
    from beit3.pretrain.visual_tokenizer import train_visual_tokenizer

    result = train_visual_tokenizer(
        VisualTokenizerConfig(
            output_dir=str(tmp_path),
            data=(str(shapes_manifest),),
            preset="vqkd-tiny",
            teacher=str(tiny_checkpoint),
            batch_size=16,
            max_steps=3,
            num_workers=0,
            tensorboard=False,
            log_every=1,
        )
    )
    model = load_vqkd(result.path)
    assert model.config.teacher_dim == 64  # beit3-tiny's width, set from the teacher
    assert all(r["rec_loss"] < 1.5 for r in read_metrics(tmp_path))
    with pytest.raises(ConfigError, match="teacher_dim is overridden"):
        train_visual_tokenizer(
            VisualTokenizerConfig(
                output_dir=str(tmp_path / "x"),
                data=(str(shapes_manifest),),
                preset="vqkd-tiny",
                overrides={"teacher_dim": 32},
                teacher=str(tiny_checkpoint),
                max_steps=1,
            )
        )


def test_tokenizer_training_resumes_the_same_run(tmp_path, shapes_manifest):
    from beit3.pretrain.config import VisualTokenizerConfig
    from beit3.pretrain.visual_tokenizer import train_visual_tokenizer

    def config(out, **kw):
        return VisualTokenizerConfig(
            output_dir=str(out),
            data=(str(shapes_manifest),),
            preset="vqkd-tiny",
            overrides={"codebook_size": 64},
            batch_size=8,
            max_steps=7,
            warmup_steps=2,
            save_every=3,
            log_every=2,  # not a divisor of save_every: the log window spans the interruption
            reseed_every=2,
            num_workers=0,
            tensorboard=False,
            **kw,
        )

    straight = train_visual_tokenizer(config(tmp_path / "a"))

    def stop_at_3(step, total):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_visual_tokenizer(config(tmp_path / "b"), progress=stop_at_3)
    assert (tmp_path / "b" / "checkpoints" / "step-00000003" / "trainer_state.pt").is_file()
    resumed = train_visual_tokenizer(config(tmp_path / "b", resume="latest"))

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [2, 4, 6, 7]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "rec_loss", "commit_loss", "codebook_usage", "codes_reseeded", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa, wb = load_vqkd(straight.path).state_dict(), load_vqkd(resumed.path).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_tokenizer_training_on_unreadable_images_stops_with_an_error(tmp_path):
    from beit3.errors import InputDataError
    from beit3.pretrain.config import VisualTokenizerConfig
    from beit3.pretrain.visual_tokenizer import train_visual_tokenizer

    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": f"gone/{i}.png", "text": f"thing {i}"}) + "\n" for i in range(12)
        )
    )
    # Every batch comes back empty: before the fix, the stream looped over epochs forever.
    with pytest.raises(InputDataError, match="image stream yields no full batch"):
        train_visual_tokenizer(
            VisualTokenizerConfig(
                output_dir=str(tmp_path / "out"),
                data=(str(manifest),),
                preset="vqkd-tiny",
                batch_size=4,
                max_steps=2,
                num_workers=0,
                tensorboard=False,
            )
        )
