"""Model configurations: one frozen dataclass and a registry of named presets.

Presets are registered once by name (``beit3-tiny`` ... ``beit3-giant``); overrides go through
:func:`create_config` or ``dataclasses.replace``, and both validate. Unknown keys in
:meth:`Beit3Config.from_dict` are rejected with the closest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from beit3.errors import ConfigError, UnknownPresetError

__all__ = [
    "Beit3Config",
    "ConfigMixin",
    "check_config_keys",
    "create_config",
    "get_preset",
    "list_presets",
    "register_preset",
]

AttentionImpl = Literal["sdpa", "eager"]

_ConfigT = TypeVar("_ConfigT", bound="ConfigMixin")


class ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``replace`` for the project's frozen config dataclasses.

    Both ways in validate: an unknown key raises :class:`ConfigError` naming the class and the
    closest field (``unknown Beit3Config key 'dpeth'; did you mean 'depth'?``), and the values go
    through the dataclass's ``__post_init__``. Not: torchscale's configs that swallow a typo.
    """

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (``json.dumps`` writes tuple fields as lists)."""
        return dataclasses.asdict(cast(Any, self))

    @classmethod
    def from_dict(cls: type[_ConfigT], data: Mapping[str, Any]) -> _ConfigT:
        """Build a config from a dict such as parsed JSON.

        JSON lists given for tuple-typed fields become tuples again, so
        ``from_dict(json.loads(json.dumps(c.to_dict()))) == c``.

        Raises:
            ConfigError: on a key that is not a field (with a spelling hint), or a bad value.
        """
        check_config_keys(cls, data, cls.__name__)
        tuple_fields = {f.name for f in dataclasses.fields(cast(Any, cls)) if _is_tuple(f.type)}
        values = {
            key: tuple(value) if key in tuple_fields and isinstance(value, list) else value
            for key, value in data.items()
        }
        return cast(Any, cls)(**values)

    def replace(self: _ConfigT, **overrides: Any) -> _ConfigT:
        """A copy with ``overrides`` applied, validated like :meth:`from_dict`.

        Raises:
            ConfigError: on a key that is not a field (with a spelling hint), or a bad value.
        """
        check_config_keys(type(self), overrides, type(self).__name__)
        return cast(_ConfigT, dataclasses.replace(cast(Any, self), **overrides))


def _is_tuple(annotation: Any) -> bool:
    # Under `from __future__ import annotations` a field's type is its source text.
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("tuple[", "Tuple[", "typing.Tuple["))


@dataclass(frozen=True, kw_only=True)
class Beit3Config(ConfigMixin):
    """Architecture of a BEiT-3 Multiway Transformer (the released, decoupled layout).

    Field names follow timm. ``vocab_size`` is the size of the text embedding table: the official
    checkpoints use 64010 (64000 sentencepiece pieces + 2 specials, padded to 64010).
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    normalize_output: bool = True
    layernorm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    use_checkpoint: bool = False
    attention: AttentionImpl = "sdpa"

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            (
                "embed_dim",
                "depth",
                "num_heads",
                "img_size",
                "patch_size",
                "in_chans",
                "vocab_size",
                "max_text_positions",
            ),
        )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.attention not in ("sdpa", "eager"):
            raise ConfigError(f"attention must be 'sdpa' or 'eager', got {self.attention!r}")
        if self.max_text_positions < 3:
            raise ConfigError("max_text_positions must be >= 3 (positions start at 2)")

    # Derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_vision_tokens(self) -> int:
        """Patches plus the CLS token."""
        return self.num_patches + 1

    @property
    def max_text_len(self) -> int:
        """Longest text the position table B can hold (fairseq offset of 2)."""
        return self.max_text_positions - 2


def check_positive_ints(config: Any, names: tuple[str, ...], what: str = "config") -> None:
    """Raise ConfigError unless every field ``names`` of ``config`` is an int > 0."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{what} field {name} must be a positive int, got {value!r}")


def check_config_keys(cls: type, data: Mapping[str, Any], what: str = "config") -> None:
    """Raise ConfigError for the first key of ``data`` that is not a field of the dataclass
    ``cls``, with the closest field as a hint (or the list of fields)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown {what} key {key!r}{hint}")


_PRESETS: dict[str, Beit3Config] = {}


def register_preset(name: str, config: Beit3Config) -> None:
    """Register ``config`` under ``name``; raises on a duplicate name."""
    if name in _PRESETS:
        raise ConfigError(f"preset {name!r} is already registered")
    _PRESETS[name] = config


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> Beit3Config:
    """Return the registered config ``name`` (e.g. ``beit3-base``)."""
    try:
        return _PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_PRESETS), n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownPresetError(f"unknown preset {name!r}{hint} (see 'beit3 presets')") from None


def create_config(name: str, **overrides: Any) -> Beit3Config:
    """Return preset ``name`` with validated ``overrides`` applied."""
    return get_preset(name).replace(**overrides) if overrides else get_preset(name)


# The table --------------------------------------------------------------------------------
# beit3-tiny: 2 layers, 64 wide, 4 heads, 32-px images, patch 16 (4 patches). 4.2M parameters,
# almost all of them the 64010-row text table; a retrieval forward of 8 images + 8 texts takes
# about 3 ms on 2 CPU cores. It exists so that tests, smoke runs and CPU demos take seconds.
register_preset("beit3-tiny", Beit3Config(embed_dim=64, depth=2, num_heads=4, img_size=32))
# beit3-small: ViT-S widths at 224. Not a released size; for small-scale pretraining runs.
register_preset("beit3-small", Beit3Config(embed_dim=384, depth=12, num_heads=6))
# The released sizes (Microsoft's checkpoints load into these unchanged).
register_preset("beit3-base", Beit3Config(embed_dim=768, depth=12, num_heads=12))
register_preset("beit3-base-384", Beit3Config(embed_dim=768, depth=12, num_heads=12, img_size=384))
register_preset("beit3-large", Beit3Config(embed_dim=1024, depth=24, num_heads=16))
register_preset(
    "beit3-large-384", Beit3Config(embed_dim=1024, depth=24, num_heads=16, img_size=384)
)
# beit3-giant: the paper's 1.9B scale (40 layers, 1408 wide, FFN 6144, patch 14), built in the
# released decoupled layout: the paper's shared attention and VL experts are not modelled.
register_preset(
    "beit3-giant",
    Beit3Config(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, patch_size=14),
)
