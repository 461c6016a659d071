"""Wrapping a model for several processes: DDP, or FSDP2 sharded per encoder layer.

One option name (``strategy``: auto | ddp | fsdp | none) and one size rule for every trainer.
FSDP shards ``model.beit3.encoder.layers`` one unit each, then the root (embeddings, heads);
0-dim parameters (``logit_scale``), which ``fully_shard`` refuses, stay unsharded and
:func:`sync_unsharded_grads` averages their gradients. State dicts are taken *full* (through
``torch.distributed.checkpoint.state_dict``), which are the same for one process, DDP and FSDP:
a run can resume under another strategy or process count.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from beit3.errors import ConfigError
from beit3.run.process import DistInfo, is_distributed

__all__ = [
    "FSDP_MIN_EMBED_DIM",
    "STRATEGIES",
    "choose_strategy",
    "full_model_state",
    "full_optimizer_state",
    "grad_sync",
    "load_full_optimizer_state",
    "sync_unsharded_grads",
    "wrap_model",
]

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp", "none")
# The size rule of ``auto``: FSDP from beit3-large (1024 wide, 24 layers) up; DDP below.
FSDP_MIN_EMBED_DIM = 1024


def choose_strategy(requested: str, info: DistInfo, embed_dim: int, shardable: bool = True) -> str:
    """The strategy a run uses: ``none`` on one process; ``auto`` -> FSDP for models at least
    :data:`FSDP_MIN_EMBED_DIM` wide (and ``shardable``), else DDP.

    Raises:
        ConfigError: an unknown strategy, ``none`` with several processes, or ``fsdp`` for a
            model that has no BEiT-3 encoder layers to shard.
    """
    if requested not in STRATEGIES:
        raise ConfigError(f"strategy {requested!r} unknown; use one of {', '.join(STRATEGIES)}")
    if info.world_size == 1:
        if requested not in ("auto", "none"):
            logger.info("one process: strategy %s not needed, training unwrapped", requested)
        return "none"
    if requested == "none":
        raise ConfigError(
            f"strategy none trains one process, but {info.world_size} were started; "
            "use ddp, fsdp or auto"
        )
    if requested == "fsdp" and not shardable:
        raise ConfigError(
            "strategy fsdp shards BEiT-3 encoder layers; this model has none: use ddp"
        )
    if requested == "auto":
        return "fsdp" if shardable and embed_dim >= FSDP_MIN_EMBED_DIM else "ddp"
    return requested


def _unsharded(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters(recurse=False) if p.ndim == 0]


def wrap_model(
    model: nn.Module,
    strategy: str,
    info: DistInfo,
    *,
    step_module: nn.Module | None = None,
    find_unused_parameters: bool = False,
    forward_methods: tuple[str, ...] = (),
) -> nn.Module:
    """The module a training step calls.

    Args:
        model: the model that owns the parameters (its backbone at ``.beit3`` for FSDP). FSDP
            shards it in place: build the optimizer after this call.
        strategy: as returned by :func:`choose_strategy`.
        step_module: a module around ``model`` that the step calls (one forward for several
            kinds of batch, as in pretraining); default ``model``.
        find_unused_parameters: DDP must look for parameters a step leaves without gradient.
        forward_methods: methods of ``model`` other than forward that FSDP must gather
            parameters for (e.g. ``encode_image`` for evaluation).
    """
    called = step_module if step_module is not None else model
    if strategy == "none":
        return called
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            called,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=True,
        )
    if strategy != "fsdp":
        raise ConfigError(f"strategy {strategy!r} unknown; use one of {', '.join(STRATEGIES)}")
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.beit3.encoder.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model, ignored_params=set(_unsharded(model)))
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return called


def sync_unsharded_grads(model: nn.Module, strategy: str) -> None:
    """Under FSDP, average the gradients it leaves alone (0-dim parameters) over ranks."""
    if strategy != "fsdp" or not is_distributed():
        return
    for param in _unsharded(model):
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()


def grad_sync(model: nn.Module, strategy: str, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on micro-batches that are not the last of a step."""
    if strategy == "ddp" and not enabled:
        return model.no_sync()  # type: ignore[operator]
    if strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    return contextlib.nullcontext()


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on CPU (a collective under FSDP: every rank calls it; the
    result is complete on rank 0). ``model`` is the parameter owner, not a DDP wrapper."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())  # type: ignore[return-value]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, full and on CPU (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Restore a :func:`full_optimizer_state` into ``optimizer`` (sharded again under FSDP).
    Not strict: a parameter that never had a gradient has no state to restore."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
    )
