"""The one pretraining loss: cross-entropy on masked positions, summed over the kinds of batch.

Each part (text-only MLM, image-only MIM, and the pair's MLM and MIM) is a mean over *all* masked
positions of the global batch: every rank divides its summed cross-entropy by the global count
(an all-reduced number) and multiplies by the world size, so DDP's gradient averaging gives
exactly the single-process gradient of the same global batch. Positions whose target is
``IGNORE_INDEX`` (padding slots of the compact position lists) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.errors import ConfigError
from beit3.pretrain.masking import IGNORE_INDEX

__all__ = ["PARTS", "MaskedModelingLoss", "MaskedStats", "masked_cross_entropy"]

# part -> the kind of batch whose mixing weight applies to it
PARTS = {"text_mlm": "text", "image_mim": "image", "pair_mlm": "pair", "pair_mim": "pair"}


class MaskedStats(NamedTuple):
    """loss_sum: summed cross-entropy (0-dim float32, differentiable); count: number of counted
    positions; correct: how many of them the argmax predicts (both 0-dim float32, no grad)."""

    loss_sum: Tensor
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count, on purpose
    correct: Tensor


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> MaskedStats:
    """Cross-entropy summed over positions whose target is not ``IGNORE_INDEX``.

    Args:
        logits: (..., C) any float dtype (computed in float32).
        targets: (...) long class ids, ``IGNORE_INDEX`` where a position does not count.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    loss_sum = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    with torch.no_grad():
        valid = flat_targets != IGNORE_INDEX
        count = valid.sum().float()
        correct = ((flat_logits.argmax(-1) == flat_targets) & valid).sum().float()
    return MaskedStats(loss_sum, count, correct)


class MaskedModelingLoss(nn.Module):
    """Weighted sum of the parts' global means.

    Args:
        text_weight, image_weight, pair_weight: mixing weights of the three kinds of batch (the
            pair weight applies to both the pair's MLM and MIM part).
    """

    def __init__(
        self, text_weight: float = 1.0, image_weight: float = 1.0, pair_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.weights = {"text": text_weight, "image": image_weight, "pair": pair_weight}
        if any(w < 0 for w in self.weights.values()):
            raise ConfigError(f"loss weights must be >= 0, got {self.weights}")

    def forward(
        self,
        stats: Mapping[str, MaskedStats],
        global_counts: Mapping[str, Tensor],
        world_size: int = 1,
    ) -> Tensor:
        """Combine the parts.

        Args:
            stats: part name (see ``PARTS``) -> its local :class:`MaskedStats`.
            global_counts: part name -> masked positions of that part summed over all ranks.
            world_size: number of ranks whose gradients DDP averages.

        Returns:
            The loss to backpropagate on this rank (0-dim float32).
        """
        total = None
        for part, s in stats.items():
            weight = self.weights[PARTS[part]]
            if weight == 0:
                continue
            term = weight * s.loss_sum * world_size / global_counts[part].clamp(min=1)
            total = term if total is None else total + term
        if total is None:
            raise ConfigError("the pretraining loss has no part with a positive weight")
        return total
