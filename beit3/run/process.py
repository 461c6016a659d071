"""Processes: joining the torchrun group, the device, collectives, and per-rank RNG.

The one place in the tree that calls ``torch.distributed.init_process_group``. Every helper is a
no-op on one process, so trainers, the evaluator and the indexer call them unconditionally.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "all_mean",
    "all_reduce_sum",
    "barrier",
    "destroy_process_group",
    "gather_features",
    "gather_rng_states",
    "gather_rows",
    "init_distributed",
    "is_distributed",
    "join_process_group",
    "rank_rng_state",
    "resolve_device",
    "set_rank_rng_state",
    "shard_range",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, world size, local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda:<LOCAL_RANK>`` when CUDA is there, else ``cpu``."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def join_process_group(backend: str, timeout: datetime.timedelta | None = None) -> None:
    """Join torchrun's process group once per process (a no-op without torchrun or when joined).

    Re-creating the default group under the same torchrun store races with stale addresses
    (gloo "connection refused"), so the group lives as long as the process and is torn down at
    exit by :func:`destroy_process_group`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if timeout is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, timeout=timeout)
    atexit.register(destroy_process_group)


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun group if there is one (nccl on CUDA, gloo on CPU) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    join_process_group("nccl" if target.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, target)


def destroy_process_group() -> None:
    """Tear the group down while Python is still whole. Left to the interpreter's exit, a gloo
    worker thread can still be releasing the tensors of the last collective when finalisation
    starts; it then needs the GIL, is unwound by the exiting interpreter inside a noexcept
    destructor, and the process aborts ("terminate called without an active exception",
    SIGABRT after all the work is done: seen in about 1 run in 25 of a 2-process test; gdb
    showed ProcessGroupGloo::runLoop -> ~AsyncWork -> decref -> take_gil -> pthread_exit).
    Collecting garbage first drops the last references to the group (a DDP wrapper in a
    reference cycle), so destroying it joins its worker threads here."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks (in place; async on CUDA: no host sync); identity on one process."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def all_mean(value: Tensor) -> float:
    """The mean of a scalar over ranks, read to the host."""
    value = value.detach().float().reshape(1).clone()
    if is_distributed():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for ``rank``: sizes differ by at most one."""
    per, extra = divmod(n, world_size)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (1 if rank < extra else 0)


def gather_rows(x: Tensor) -> Tensor:
    """(n_r, ...) blocks of possibly different n_r on every rank -> their rank-major
    concatenation on every rank (no gradient)."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    blocks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(blocks, padded.contiguous())
    return torch.cat([b[:n] for b, n in zip(blocks, counts, strict=True)])


class _GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's
    slice, so a loss over gathered features gets the same gradients as one big process."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_features(x: Tensor) -> Tensor:
    """(B, D) per rank -> (world * B, D), rank-major, differentiable; identity without a group."""
    if not is_distributed():
        return x
    return torch.cat(_GatherLayer.apply(x), dim=0)


def rank_rng_state() -> dict[str, Tensor]:
    """This process's torch RNG (drop path draws), CPU and current CUDA device."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict[str, Tensor]]:
    """Every rank's :func:`rank_rng_state`, in rank order (a collective when distributed): each
    rank draws its own drop-path masks, so a resume must restore each rank's own stream."""
    state = rank_rng_state()
    if not is_distributed():
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def set_rank_rng_state(states: list[dict[str, Tensor]], rank: int) -> bool:
    """Restore this rank's RNG from :func:`gather_rng_states`; False (nothing restored) when the
    saved run had fewer processes."""
    if not states or rank >= len(states):
        return False
    torch.set_rng_state(states[rank]["cpu"])
    if "cuda" in states[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])
    return True
