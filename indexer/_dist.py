"""torchrun support: each rank embeds its shard and writes its own chunks; rank 0 commits.

Under ``torchrun`` (``WORLD_SIZE`` > 1) a gloo process group carries the few small messages an
indexing run needs (barriers, the hashes each rank computed, the per-rank failures). gloo works on
CPU and beside CUDA, and never touches the model. Without torchrun everything is a no-op.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from beit3.run import join_process_group

__all__ = ["DistContext"]


class DistContext:
    """Rank, world size and the collectives an indexing run uses."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1:
            import torch.distributed as dist

            # Rank 0 may build a large ANN index while the others wait at a barrier.
            join_process_group("gloo", timeout=datetime.timedelta(hours=12))
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's items: every world_size-th, starting at rank."""
        return items[self.rank :: self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a one-item list without torchrun)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
