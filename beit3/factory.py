"""Build models by preset name and architecture name.

Architectures register themselves (``register_architecture``): the retrieval model here, the
pretraining model in :mod:`beit3.pretrain.model`, the matcher where it is defined. The factory
imports no model package above it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from beit3.config import Beit3Config, create_config
from beit3.errors import ConfigError
from beit3.heads import Beit3ForRetrieval, Beit3WithMatcher

__all__ = [
    "architecture_of",
    "create_model",
    "get_architecture",
    "list_architectures",
    "register_architecture",
]

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "retrieval": Beit3ForRetrieval,
    "retrieval-itm": Beit3WithMatcher,  # the dual encoder + the fusion-encoder matcher
}


def register_architecture(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``name`` buildable and loadable. The model's backbone must live at ``.beit3``."""
    if name in _ARCHITECTURES and _ARCHITECTURES[name] is not factory:
        raise ConfigError(f"architecture {name!r} is already registered")
    _ARCHITECTURES[name] = factory


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> Callable[..., nn.Module]:
    if name not in _ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {sorted(_ARCHITECTURES)}")
    return _ARCHITECTURES[name]


def architecture_of(model: nn.Module) -> str:
    """The registered name of ``model``'s class: the nearest registered class in its MRO, so
    a model that FSDP re-classed in place (``FSDPBeit3ForRetrieval``) still answers."""
    registered = {f: name for name, f in _ARCHITECTURES.items() if isinstance(f, type)}
    for cls in type(model).__mro__:
        if cls in registered:
            return registered[cls]
    raise ConfigError(f"{type(model).__name__} is not a registered architecture")


def create_model(preset: str, architecture: str = "retrieval", **overrides: Any) -> nn.Module:
    """Build a freshly initialised model, e.g. ``create_model("beit3-tiny", drop_path_rate=0.1)``.

    Keys that are Beit3Config fields override the preset; any other keyword goes to the
    architecture's constructor (e.g. ``codebook_size`` of the pretraining model).
    """
    fields = {f.name for f in dataclasses.fields(Beit3Config)}
    config = create_config(preset, **{k: v for k, v in overrides.items() if k in fields})
    return get_architecture(architecture)(
        config, **{k: v for k, v in overrides.items() if k not in fields}
    )
