"""AdamW with the official weight-decay and layer-decay groups, and the warmup + cosine schedule.

The one builder of AdamW parameter groups in the tree (fine-tuning, pretraining and the VQ-KD
tokenizer all call :func:`build_adamw`), and their one optimizer step (:func:`clipped_step`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "NO_WEIGHT_DECAY",
    "build_adamw",
    "clipped_step",
    "cosine_lr",
    "layer_id",
    "param_groups",
    "set_lr",
]

# Official BEiT3Wrapper.no_weight_decay() (the text table, B positions and mask token ARE decayed).
NO_WEIGHT_DECAY = frozenset(
    {
        "beit3.encoder.embed_positions.A.weight",
        "beit3.vision_embed.cls_token",
        "logit_scale",
    }
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile


def layer_id(name: str, num_layers: int) -> int:
    """Official layer-decay id: embeddings 0, layer k -> k + 1, everything else L + 1.

    The matcher's own parts (``itm_*``: its fusion layers and head, new weights on top of the
    backbone) count as head, L + 1, whatever their own layer numbering.
    """
    if name.startswith("itm_"):
        return num_layers + 1
    if "embed" in name:
        return 0
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    no_decay: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: no decay for 1-D tensors, biases, :data:`NO_WEIGHT_DECAY` and names that
    ``no_decay`` accepts; each group carries an ``lr_scale`` = layer_decay ** (L + 1 - layer id)
    (1 when layer_decay is None) that :func:`set_lr` applies."""
    if num_layers is None:
        num_layers = getattr(getattr(model, "config", None), "depth", 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        skip = (
            param.ndim <= 1
            or name.endswith(".bias")
            or name in NO_WEIGHT_DECAY
            or (no_decay is not None and no_decay(name))
        )
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (lid, skip),
            {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if skip else weight_decay,
                "lr_scale": scale,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
    strategy: str = "none",
    layer_decay: float | None = None,
    no_decay: Callable[[str], bool] | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``fused`` None: the fused kernel on CUDA, except under
    FSDP (its parameters are DTensors; the foreach kernel serves them)."""
    if fused is None:
        fused = device.type == "cuda" and strategy != "fsdp"
    groups = param_groups(model, weight_decay, layer_decay, no_decay=no_decay)
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {})
    )


def cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0
) -> float:
    """Linear warmup from 0 (as the official code), then cosine decay to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clipped_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
) -> torch.Tensor:
    """Clip the gradients' global L2 norm to ``grad_clip`` (0: no clipping), step, zero them.

    Returns:
        The norm before clipping (0-dim; measured also when not clipping, for the run log).
    """
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
