"""Patch embedding for images (with CLS and mask tokens); positional tables."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from beit3.errors import InputDataError

__all__ = ["PositionTable", "VisionEmbedding"]

# fairseq convention kept by the official code: positions start at 2, rows 0 and 1 are unused.
POSITION_OFFSET = 2


class VisionEmbedding(nn.Module):
    """Conv patchify, optional mask-token replacement, then a prepended CLS token.

    Keys: ``proj.weight`` (D, C, P, P), ``proj.bias`` (D), ``cls_token`` (1, 1, D),
    ``mask_token`` (1, 1, D).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def forward(self, images: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """Embed images.

        Args:
            images: (B, C, H, W) float, H = W = img_size.
            image_mask: (B, N) bool, True = replace that patch by ``mask_token`` (pretraining).

        Returns:
            (B, N + 1, D): CLS then the patches in row-major order.
        """
        if images.ndim != 4 or images.shape[-2:] != (self.img_size, self.img_size):
            raise InputDataError(
                f"images have shape {tuple(images.shape)}; the model expects "
                f"(B, 3, {self.img_size}, {self.img_size}): resize with the checkpoint's preprocess"
            )
        x = self.proj(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if image_mask is not None:
            w = image_mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)


class PositionTable(nn.Embedding):
    """Learned absolute positions; a sequence of length L uses rows 2 .. L + 1."""

    def positions(self, length: int) -> Tensor:
        """Return (1, L, D) position embeddings for a part of length ``length``."""
        if length + POSITION_OFFSET > self.num_embeddings:
            raise InputDataError(
                f"sequence of {length} tokens is longer than the position table allows "
                f"({self.num_embeddings - POSITION_OFFSET}); truncate the input"
            )
        return self.weight[POSITION_OFFSET : POSITION_OFFSET + length].unsqueeze(0)
