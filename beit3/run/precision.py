"""The precision policy of every trainer, the evaluator and the indexer: one rule.

``auto`` is bf16 autocast on CUDA and fp32 elsewhere; ``fp32`` is fp32 everywhere; ``bf16``
asked for on a device without CUDA is refused (bf16 runs about 100x slower than fp32 on the
CPUs this project measured, so a silent fallback or a slow run would both mislead).
"""

from __future__ import annotations

import contextlib

import torch

from beit3.errors import ConfigError

__all__ = ["PRECISIONS", "autocast", "resolve_bf16"]

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run with ``precision`` on ``device`` uses bf16 autocast.

    Raises:
        ConfigError: an unknown precision, or ``bf16`` without CUDA.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError(
            f"precision bf16 needs a CUDA device, this run is on {device} (bf16 on CPU is ~100x "
            "slower than fp32 here); use fp32 or auto"
        )
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; nothing otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
