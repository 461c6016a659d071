"""Wrapping the pretraining model for several processes (DDP, FSDP2) and saving/restoring it.

Both wrappers see one forward per step (:class:`StepModule` runs every kind of batch) and one
backward, so gradients are reduced once. Saving goes through the full (unsharded) state dicts of
``torch.distributed.checkpoint.state_dict``, which are the same for DDP, FSDP and one process:
a run can resume under another sharding or process count.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from beit3.pretrain.data import MaskedBatch
from beit3.pretrain.model import Beit3ForPretraining, PretrainingOutput

__all__ = [
    "StepModule",
    "all_reduce_sum",
    "full_model_state",
    "full_state",
    "load_optimizer_state",
    "wrap_model",
]

logger = logging.getLogger(__name__)


class StepModule(nn.Module):
    """Runs every kind of batch of one step through the model: one forward for DDP / FSDP."""

    def __init__(self, model: Beit3ForPretraining) -> None:
        super().__init__()
        self.model = model

    def forward(self, batches: Mapping[str, MaskedBatch]) -> dict[str, PretrainingOutput]:
        return {
            kind: self.model(
                images=b.images,
                text_ids=b.text_ids,
                padding_mask=b.padding_mask,
                image_mask=b.image_mask,
                text_positions=b.text_positions,
                image_positions=b.image_positions,
            )
            for kind, b in batches.items()
        }


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks (in place; async on CUDA: no host sync); identity on one process."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def shard_fsdp(model: Beit3ForPretraining) -> None:
    """FSDP2: each encoder layer is a unit, the root holds embeddings and heads."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.beit3.encoder.layers:
        fully_shard(layer)
    fully_shard(model)


def wrap_model(
    model: Beit3ForPretraining, sharding: str, device: torch.device, find_unused: bool
) -> nn.Module:
    """The module to call each step: StepModule, wrapped in DDP when distributed with ``ddp``
    (FSDP shards ``model`` in place before the optimizer is built; see :func:`shard_fsdp`)."""
    step = StepModule(model)
    if not is_distributed() or sharding == "fsdp":
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        step,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
        gradient_as_bucket_view=True,
        broadcast_buffers=False,
    )


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full CPU state dicts of model and optimizer (a collective under FSDP: call on all ranks;
    the result is complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """Full CPU model state dict (a collective under FSDP; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, step_dir: str | Path
) -> None:
    """Restore the optimizer state saved by the training loop (parameter names as keys)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from beit3.runtime import STATE_FILE

    saved = torch.load(Path(step_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(
        model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True)
    )


class StateDictHolder:
    """Gives ``save_train_state`` an object with ``state_dict()`` for a precomputed state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def shadow_model(model: Beit3ForPretraining, state: dict[str, Tensor]) -> Beit3ForPretraining:
    """An unwrapped CPU copy holding ``state`` (for save_checkpoint, which wants the plain class)."""
    with torch.device("meta"):
        copy = Beit3ForPretraining(model.config, codebook_size=model.codebook_size)
    copy.load_state_dict(state, assign=True, strict=True)
    return copy
