"""Task models on top of the backbone: the dual-encoder retrieval model."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.config import Beit3Config
from beit3.model import Beit3Model, trunc_normal_

__all__ = ["Beit3ForRetrieval", "RetrievalOutput"]


class RetrievalOutput(NamedTuple):
    """image_embeds (B, D) / text_embeds (B, D): L2-normalised float32 (None if not given);
    logit_scale: the learned log temperature (0-dim), for the contrastive loss."""

    image_embeds: Tensor | None
    text_embeds: Tensor | None
    logit_scale: Tensor


class Beit3ForRetrieval(nn.Module):
    """Dual encoder, keys as in the official ``BEiT3ForRetrieval``.

    Keys: ``beit3.*`` (backbone), ``vision_head.weight`` (D, D), ``language_head.weight`` (D, D),
    ``logit_scale`` (0-dim). Images and texts go through *separate* single-modality passes; each
    pools token 0 (vision CLS / text ``<s>``, after the final LayerNorm), projects it with a
    bias-free head and L2-normalises it.
    """

    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        self.config = config
        self.beit3 = Beit3Model(config)
        self.vision_head = nn.Linear(config.embed_dim, config.embed_dim, bias=False)
        self.language_head = nn.Linear(config.embed_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_heads()

    @torch.no_grad()
    def init_heads(self) -> None:
        trunc_normal_(self.vision_head.weight, std=0.02)
        trunc_normal_(self.language_head.weight, std=0.02)
        self.logit_scale.fill_(math.log(1 / 0.07))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) unit-norm float32 embeddings."""
        hidden = self.beit3(images=images, first_token_only=True).hidden_states  # (B, 1, D)
        return F.normalize(self.vision_head(hidden[:, 0]).float(), dim=-1)

    def encode_text(self, text_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids and (B, L) bool padding mask (True = pad) -> (B, D) unit-norm float32."""
        hidden = self.beit3(
            text_ids=text_ids, padding_mask=padding_mask, first_token_only=True
        ).hidden_states  # (B, 1, D)
        return F.normalize(self.language_head(hidden[:, 0]).float(), dim=-1)

    def forward(
        self,
        images: Tensor | None = None,
        text_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> RetrievalOutput:
        """Embed whichever of images / texts is given (each in its own pass)."""
        image_embeds = self.encode_image(images) if images is not None else None
        text_embeds = self.encode_text(text_ids, padding_mask) if text_ids is not None else None
        return RetrievalOutput(image_embeds, text_embeds, self.logit_scale)
