"""Exceptions for bad input.

Every error a user can cause derives from :class:`Beit3Error` and from the builtin that fits
(``ValueError`` mostly), so callers can catch either. Messages name what failed, where, what came
in versus what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "Beit3Error",
    "CheckpointError",
    "ConfigError",
    "IndexMismatchError",
    "InputDataError",
    "UnknownPresetError",
]


class Beit3Error(Exception):
    """Base of every error caused by input (config, checkpoint, data, index)."""


class ConfigError(Beit3Error, ValueError):
    """A configuration value or key is invalid."""


class UnknownPresetError(ConfigError):
    """A preset name is not registered."""


class CheckpointError(Beit3Error, ValueError):
    """A checkpoint file or directory is missing, corrupt, or does not fit the model."""


class IndexMismatchError(Beit3Error, ValueError):
    """An index was built by another model, or with another dimension."""


class InputDataError(Beit3Error, ValueError):
    """Input data (an image, a manifest, a text file) cannot be used."""
