"""Process-group helpers for fine-tuning and evaluation: model wrapping (DDP / FSDP), gathers of
uneven row blocks, full state dicts, per-rank RNG. Everything is a no-op on one process."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from beit3.runtime import DistInfo

__all__ = [
    "all_mean",
    "barrier",
    "full_state_dict",
    "gather_rows",
    "grad_sync",
    "shard_range",
    "sync_unsharded_grads",
    "wrap_model",
]

logger = logging.getLogger(__name__)


def _active(info: DistInfo | None) -> bool:
    return (
        info is not None and info.world_size > 1 and dist.is_available() and dist.is_initialized()
    )


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for ``rank``: sizes differ by at most one."""
    per, extra = divmod(n, world_size)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (1 if rank < extra else 0)


def barrier(info: DistInfo | None) -> None:
    if _active(info):
        dist.barrier()


def gather_rows(x: Tensor, info: DistInfo | None) -> Tensor:
    """(n_r, ...) blocks of possibly different n_r on every rank -> their rank-major concatenation
    on every rank (no gradient)."""
    if not _active(info):
        return x
    assert info is not None
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(s.item()) for s in sizes]
    largest = max(counts)
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    blocks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(blocks, padded.contiguous())
    return torch.cat([b[:n] for b, n in zip(blocks, counts, strict=True)])


def all_mean(value: Tensor, info: DistInfo | None) -> float:
    """The mean of a scalar over ranks."""
    value = value.detach().float().reshape(1).clone()
    if _active(info):
        assert info is not None
        dist.all_reduce(value)
        value /= info.world_size
    return float(value.item())


# Wrapping ----------------------------------------------------------------------------------


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard``) per encoder layer then the whole model.

    ``logit_scale`` is a 0-dim parameter, which ``fully_shard`` refuses: it stays unsharded and
    :func:`sync_unsharded_grads` averages its gradient. The FSDP model also answers
    ``encode_image`` / ``encode_text`` (registered as forward methods) for evaluation.
    """
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.beit3.encoder.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model, ignored_params=set(_unsharded(model)))
    for name in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, name)
    return model


def _unsharded(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters(recurse=False) if p.ndim == 0]


def sync_unsharded_grads(model: nn.Module, info: DistInfo) -> None:
    """Average the gradients FSDP leaves alone (the 0-dim ``logit_scale``) over ranks."""
    if not _active(info):
        return
    for param in _unsharded(model):
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= info.world_size


def grad_sync(model: nn.Module, strategy: str, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on micro-batches that are not the last of a step."""
    if strategy == "ddp" and not enabled:
        return model.no_sync()  # type: ignore[operator]
    if strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    return contextlib.nullcontext()


def full_state_dict(model: nn.Module, strategy: str) -> dict[str, Tensor]:
    """The whole model's state dict on CPU. Collective under FSDP (every rank must call it); the
    result is complete on rank 0 only."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    module = model.module if strategy == "ddp" else model
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
