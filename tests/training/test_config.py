"""The fine-tuning and evaluation configs validate keys like every other config."""

import dataclasses
import json

import pytest

from beit3 import ConfigError
from training.config import EvalConfig, FinetuneConfig

CONFIGS = [
    pytest.param(
        FinetuneConfig(train="pairs.jsonl", output_dir="run", preset="beit3-tiny"),
        "layer_decay",
        "layer_decy",
        id="FinetuneConfig",
    ),
    pytest.param(
        EvalConfig(checkpoint="ckpt", data="pairs.jsonl"),
        "block_size",
        "blocksize",
        id="EvalConfig",
    ),
]


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


def test_replace_still_validates_values():
    config = FinetuneConfig(train="pairs.jsonl", output_dir="run", preset="beit3-tiny")
    assert config.replace(betas=(0.9, 0.98)).betas == (0.9, 0.98)
    with pytest.raises(ConfigError, match="layer_decay"):
        config.replace(layer_decay=1.5)
