"""The CLIP-style symmetric contrastive loss of BEiT-3 retrieval fine-tuning.

Official semantics (unilm ``utils.ClipLoss``, spec 6.2): each rank scores its own images against
the texts of *all* ranks and its own texts against all images, gathered with gradients;
labels = arange(B) + B * rank; loss = (CE(image->text) + CE(text->image)) / 2 with
scale = exp(logit_scale), no clamp. Duplicates of one image inside a batch stay negatives.

Hard negatives (relevance feedback: images known not to match a text) are extra columns of
their own text's row of the text->image logits only: each negative image is scored against the
one text that owns it (-inf elsewhere), on this rank, not gathered. The image->text direction
is unchanged (a negative image has no text of its own).

Generalisation: ranks may hold different batch sizes (a broken image dropped from one rank's
batch, or an empty batch). Each rank's loss is then the sum of its rows' cross-entropies divided by
the *mean* batch size over ranks, so the average over ranks (what DDP's gradient averaging
optimises) is exactly the single-process loss on the global batch. With equal batch sizes this is
the official per-rank mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.run import DistInfo, gather_features

__all__ = ["ClipLoss", "ContrastiveOutput"]


class ContrastiveOutput(NamedTuple):
    """loss: 0-dim float32. logits_per_image (B, B_global) scores this rank's images against
    every rank's texts, logits_per_text (B, B_global) its texts against every image; labels (B,)
    the column of each row's own pair (hard negatives are mined from these logits).
    hard_negative_logits (B, N): the texts against the given hard-negative images (-inf where
    a text does not own the negative); None without them."""

    loss: Tensor
    logits_per_image: Tensor
    logits_per_text: Tensor
    labels: Tensor
    hard_negative_logits: Tensor | None = None


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over (image, text) embedding pairs, gathered across ranks.

    Args:
        rank: this process's rank (or pass ``dist_info``).
        world_size: number of processes; > 1 requires an initialised process group.
        dist_info: a :class:`beit3.run.DistInfo` instead of rank / world_size.
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, dist_info: DistInfo | None = None
    ) -> None:
        super().__init__()
        if dist_info is not None:
            rank, world_size = dist_info.rank, dist_info.world_size
        assert 0 <= rank < world_size, f"rank {rank} outside world size {world_size}"
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        logit_scale: Tensor,
        negative_embeds: Tensor | None = None,
        negative_owner: Tensor | None = None,
    ) -> ContrastiveOutput:
        """Loss of this rank's pairs.

        Args:
            image_embeds: (B, D) L2-normalised image embeddings; row i pairs with text row i.
            text_embeds: (B, D) L2-normalised text embeddings.
            logit_scale: 0-dim *log* temperature, as :class:`beit3.RetrievalOutput` carries it
                (exponentiated here, as the official model does before its loss).
            negative_embeds: (N, D) L2-normalised embeddings of hard-negative images, or None.
            negative_owner: (N,) long: the text row (0..B-1) each negative belongs to.

        Returns:
            :class:`ContrastiveOutput`. Averaged over ranks its loss equals the single-process
            loss on the concatenated global batch, and so do the DDP-averaged gradients.
        """
        assert image_embeds.shape == text_embeds.shape, (
            f"image {tuple(image_embeds.shape)} and text {tuple(text_embeds.shape)} embeddings differ"
        )
        scale = logit_scale.float().exp()
        image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
        local = image_embeds.shape[0]
        if self.world_size == 1:
            all_images, all_texts, offset, mean_batch = image_embeds, text_embeds, 0, local
        else:
            sizes = _gather_sizes(local, image_embeds.device, self.world_size)
            offset, mean_batch = sum(sizes[: self.rank]), sum(sizes) / self.world_size
            all_images = _gather_ragged(image_embeds, sizes)
            all_texts = _gather_ragged(text_embeds, sizes)
        labels = torch.arange(local, device=image_embeds.device) + offset
        logits_per_image = scale * image_embeds @ all_texts.T  # (B, B_global)
        logits_per_text = scale * text_embeds @ all_images.T  # (B, B_global)
        if local == 0:
            # Keep the graph connected so this rank still takes part in the gather's backward
            # and every parameter (logit_scale too) gets a (zero) gradient for DDP.
            zero = (all_images.sum() + all_texts.sum() + scale) * 0.0
            return ContrastiveOutput(zero, logits_per_image, logits_per_text, labels)
        hard = None
        text_side = logits_per_text
        if negative_embeds is not None and negative_embeds.shape[0] > 0:
            assert (
                negative_owner is not None and negative_owner.shape == negative_embeds.shape[:1]
            ), "negative_owner must give one text row per negative"
            rows = torch.arange(local, device=negative_owner.device)
            owned = negative_owner.unsqueeze(0) == rows.unsqueeze(1)  # (B, N)
            hard = scale * text_embeds @ negative_embeds.float().T  # (B, N)
            hard = hard.masked_fill(~owned, float("-inf"))
            text_side = torch.cat([logits_per_text, hard], dim=1)  # (B, B_global + N)
        loss = (
            F.cross_entropy(logits_per_image, labels, reduction="sum")
            + F.cross_entropy(text_side, labels, reduction="sum")
        ) / 2
        return ContrastiveOutput(loss / mean_batch, logits_per_image, logits_per_text, labels, hard)


def _gather_sizes(local: int, device: torch.device, world_size: int) -> list[int]:
    size = torch.tensor([local], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_ragged(x: Tensor, sizes: list[int]) -> Tensor:
    """Differentiable all-gather of (B_r, D) blocks of different B_r: pad to the largest, gather
    with beit3.run.gather_features, drop the padding rows."""
    largest = max(sizes)
    if min(sizes) == largest:
        return gather_features(x)
    padded = F.pad(x, (0, 0, 0, largest - x.shape[0]))  # (B_max, D)
    gathered = gather_features(padded)  # (world * B_max, D), rank-major
    keep = torch.cat([torch.arange(n, device=x.device) + r * largest for r, n in enumerate(sizes)])
    return gathered.index_select(0, keep)
