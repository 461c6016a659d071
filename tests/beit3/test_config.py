import dataclasses
import json

import pytest
import torch

from beit3 import ConfigError, UnknownPresetError, create_config, create_model, list_presets
from beit3.config import Beit3Config, get_preset
from beit3.pretrain.config import PretrainConfig, VisualTokenizerConfig
from beit3.pretrain.vqkd import get_vqkd_preset
from beit3.transforms import PreprocessConfig

# One valid instance of every config class in beit3/, a field of it and a misspelling of that field.
CONFIGS = [
    pytest.param(get_preset("beit3-tiny"), "drop_path_rate", "drop_path_rte", id="Beit3Config"),
    pytest.param(get_vqkd_preset("vqkd-tiny"), "codebook_size", "codebok_size", id="VqkdConfig"),
    pytest.param(PreprocessConfig(img_size=32), "max_text_len", "max_txt_len", id="Preprocess"),
    pytest.param(
        PretrainConfig(output_dir="run", pair_data=("pairs.jsonl",)),
        "text_mask_ratio",
        "text_mask_ratoi",
        id="PretrainConfig",
    ),
    pytest.param(
        VisualTokenizerConfig(output_dir="run", data=("images",)),
        "kmeans_iters",
        "kmeans_itres",
        id="VisualTokenizerConfig",
    ),
]


def _count(preset: str, **overrides):
    with torch.device("meta"):
        model = create_model(preset, **overrides)
    sd = model.state_dict()
    return len(sd), sum(t.numel() for t in sd.values())


@pytest.mark.parametrize(
    ("preset", "tensors", "params"),
    [
        # Counts of the official unilm models (shared/reference/beit3_spec.md section 1.2).
        ("beit3-base", 494, 222_167_041),
        ("beit3-base-384", 494, 222_458_881),
        ("beit3-large-384", 974, 675_188_737),
    ],
)
def test_parameter_counts_match_official_retrieval_models(preset, tensors, params):
    assert _count(preset) == (tensors, params)


def test_giant_preset_is_the_papers_scale():
    cfg = get_preset("beit3-giant")
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_dim, cfg.patch_size) == (
        40,
        1408,
        16,
        6144,
        14,
    )
    _, params = _count("beit3-giant")
    # Decoupled layout at the paper's widths: two full experts, so more than the paper's 1.9B.
    assert 1.9e9 < params < 3.2e9


def test_presets_are_named_canonically():
    names = list_presets()
    assert {
        "beit3-tiny",
        "beit3-small",
        "beit3-base",
        "beit3-base-384",
        "beit3-large",
        "beit3-large-384",
        "beit3-giant",
    } <= set(names)
    assert all(n == n.lower() and n.startswith("beit3-") for n in names)


def test_unknown_key_suggests_closest_spelling():
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        Beit3Config.from_dict({"embed_dim": 64, "dpeth": 2, "num_heads": 4})
    with pytest.raises(ConfigError, match="drop_path_rate"):
        create_config("beit3-tiny", drop_path=0.1)


def test_unknown_preset_suggests_names():
    with pytest.raises(UnknownPresetError, match="beit3-base") as info:
        create_config("beit3-bsae")
    assert "beit3 presets" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dim": 65}, "not divisible"),
        ({"img_size": 40}, "multiple of patch_size"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"attention": "flash"}, "attention"),
        ({"depth": 0}, "positive int"),
    ],
)
def test_invalid_values_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_config("beit3-tiny", **overrides)


def test_config_round_trips_and_derives():
    cfg = create_config("beit3-base-384")
    assert Beit3Config.from_dict(cfg.to_dict()) == cfg
    assert (cfg.head_dim, cfg.num_patches, cfg.num_vision_tokens, cfg.ffn_dim) == (
        64,
        576,
        577,
        3072,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3  # type: ignore[misc]


@pytest.mark.parametrize(("config", "field", "typo"), CONFIGS)
def test_misspelt_key_names_the_closest_field_in_from_dict_and_replace(config, field, typo):
    cls = type(config)
    message = rf"unknown {cls.__name__} key '{typo}'; did you mean '{field}'\?"
    data = config.to_dict()
    data[typo] = data.pop(field)
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(data)
    with pytest.raises(ConfigError, match=message):
        config.replace(**{typo: getattr(config, field)})


@pytest.mark.parametrize(("config", "field", "typo"), CONFIGS)
def test_config_round_trips_through_json_with_tuples_restored(config, field, typo):
    restored = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    for f in dataclasses.fields(config):
        assert type(getattr(restored, f.name)) is type(getattr(config, f.name)), f.name
    changed = config.replace(**{field: getattr(config, field)})
    assert changed == config and type(changed) is type(config)
