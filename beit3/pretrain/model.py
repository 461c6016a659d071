"""The pretraining model: the BEiT-3 backbone with a masked-language and a masked-image head.

Keys: ``beit3.*`` (the backbone, as in every task model, so the weights transfer to retrieval),
``mlm_head.weight`` (V, D) / ``.bias`` (V) over the text vocabulary, and ``mim_head.weight``
(K, D) / ``.bias`` (K) over the visual tokenizer's codebook (the names the official pretrained
checkpoints carry, spec 1.3). The heads read the backbone's output (after its final LayerNorm)
only at the masked positions, which the data loader lists as fixed-size index tensors, so no
boolean indexing (and no device sync) happens in the step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from beit3.config import Beit3Config
from beit3.factory import register_architecture
from beit3.model import Beit3Model, trunc_normal_

__all__ = ["DEFAULT_CODEBOOK_SIZE", "Beit3ForPretraining", "PretrainingOutput", "gather_positions"]

DEFAULT_CODEBOOK_SIZE = 8192  # BEiT v2 / BEiT-3 VQ-KD codebook


class PretrainingOutput(NamedTuple):
    """mlm_logits (B, Kt, V) at the requested text positions, mim_logits (B, Ki, K) at the
    requested patch positions; None where no positions were given."""

    mlm_logits: Tensor | None
    mim_logits: Tensor | None


def gather_positions(x: Tensor, positions: Tensor) -> Tensor:
    """(B, T, D) and (B, K) long -> (B, K, D): the rows of ``x`` at ``positions``."""
    index = positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, K, D)
    return torch.gather(x, 1, index)


class Beit3ForPretraining(nn.Module):
    """Backbone + MLM head + MIM head for masked data modeling (BEiT-3 Sec. 2.3).

    Args:
        config: backbone architecture.
        codebook_size: number of visual codes the MIM head predicts (the VQ-KD codebook size).
    """

    def __init__(self, config: Beit3Config, codebook_size: int = DEFAULT_CODEBOOK_SIZE) -> None:
        super().__init__()
        self.config = config
        self.codebook_size = codebook_size
        self.beit3 = Beit3Model(config)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.mim_head = nn.Linear(config.embed_dim, codebook_size)
        self.init_heads()

    @property
    def architecture_args(self) -> dict[str, int]:
        """Constructor arguments besides the config; saved in config.json by save_checkpoint."""
        return {"codebook_size": self.codebook_size}

    @torch.no_grad()
    def init_heads(self) -> None:
        for head in (self.mlm_head, self.mim_head):
            trunc_normal_(head.weight, std=0.02)
            head.bias.zero_()

    def forward(
        self,
        images: Tensor | None = None,
        text_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        text_positions: Tensor | None = None,
        image_positions: Tensor | None = None,
    ) -> PretrainingOutput:
        """One pass over text-only, image-only or image-text input.

        Args:
            images: (B, 3, H, W) float or None.
            text_ids: (B, L) long, masked tokens already replaced by the mask id, or None.
            padding_mask: (B, L) bool, True = padding.
            image_mask: (B, N) bool, True = patch replaced by the mask token.
            text_positions: (B, Kt) long text positions to predict (0-based within the text).
            image_positions: (B, Ki) long patch positions to predict (0-based, CLS excluded).

        Returns:
            :class:`PretrainingOutput` with logits in the autocast dtype.
        """
        out = self.beit3(
            images=images, text_ids=text_ids, padding_mask=padding_mask, image_mask=image_mask
        )
        hidden, num_vision = out.hidden_states, out.num_vision_tokens
        mlm = mim = None
        if text_positions is not None:
            mlm = self.mlm_head(gather_positions(hidden[:, num_vision:], text_positions))
        if image_positions is not None:
            if num_vision == 0:
                raise ValueError("image_positions given for a text-only pass")
            mim = self.mim_head(gather_positions(hidden[:, 1:num_vision], image_positions))
        return PretrainingOutput(mlm, mim)


register_architecture("pretraining", Beit3ForPretraining)
