"""The BEiT-3 backbone: embeddings and masks, the Multiway encoder (:mod:`beit3.encoder`), and
weight init.

State-dict keys equal the official ``beit3.*`` keys (without the prefix), e.g.
``encoder.layers.0.self_attn.q_proj.A.weight``. Forward takes the modality split explicitly.
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from beit3.config import Beit3Config
from beit3.embeddings import VisionEmbedding
from beit3.encoder import Encoder, EncoderLayer
from beit3.errors import InputDataError
from beit3.multiway import join_parts

__all__ = [
    "Beit3Model",
    "Beit3Output",
    "attention_mask",
    "joint_padding_mask",
    "trunc_normal_",
]


class Beit3Output(NamedTuple):
    """Backbone output.

    hidden_states: (B, T, D), vision tokens (CLS first) then text tokens.
    num_vision_tokens: how many leading tokens are vision tokens (0 for text-only input).
    padding_mask: (B, T) bool, True = padding; None when nothing is padded.
    """

    hidden_states: Tensor
    num_vision_tokens: int
    padding_mask: Tensor | None


class Beit3Model(nn.Module):
    """The Multiway Transformer backbone (released BEiT-3 layout).

    Args:
        config: architecture; see :mod:`beit3.config` for presets.
    """

    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        self.config = config
        self.text_embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.vision_embed = VisionEmbedding(
            config.img_size, config.patch_size, config.in_chans, config.embed_dim
        )
        self.encoder = Encoder(config)
        self.init_weights()

    def forward(
        self,
        images: Tensor | None = None,
        text_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        first_token_only: bool = False,
        num_layers: int | None = None,
    ) -> Beit3Output:
        """Encode images, texts, or image-text pairs jointly.

        Args:
            images: (B, 3, H, W) float, preprocessed; None for text-only.
            text_ids: (B, L) long token ids; None for image-only.
            padding_mask: (B, L) bool, True = padding (text only).
            image_mask: (B, N) bool, True = patch replaced by the mask token (pretraining).
            first_token_only: return only each modality's first token (vision CLS, text <s>);
                the last layer then computes just those, which is exact and saves most of it.
            num_layers: run only the first ``num_layers`` layers and skip the final LayerNorm
                (the intermediate states; ``first_token_only`` is then ignored).

        Returns:
            :class:`Beit3Output` with hidden states (B, Nv + L, D), or (B, 1 or 2, D) with
            ``first_token_only`` (num_vision_tokens is then 1 when images were given).
        """
        if images is None and text_ids is None:
            raise InputDataError("Beit3Model.forward needs images, text_ids, or both")
        pos = self.encoder.embed_positions
        vision = text = None
        if images is not None:
            vision = self.vision_embed(images, image_mask)  # (B, N + 1, D)
            vision = vision + pos.A.positions(vision.shape[1])
        if text_ids is not None:
            if text_ids.ndim != 2:
                raise InputDataError(f"text_ids must be (B, L), got shape {tuple(text_ids.shape)}")
            text = self.text_embed(text_ids)  # (B, L, D)
            # In image+text mode the text positions restart at 2 (their own table B).
            text = text + pos.B.positions(text.shape[1])
            if padding_mask is not None:
                text = text * (~padding_mask).unsqueeze(-1).to(text.dtype)
        if vision is not None and text is not None and vision.shape[0] != text.shape[0]:
            raise InputDataError(
                f"{vision.shape[0]} images but {text.shape[0]} texts: a joint forward needs pairs"
            )

        num_vision = vision.shape[1] if vision is not None else 0
        full_mask = None
        if text is not None and padding_mask is not None:
            full_mask = joint_padding_mask(num_vision, padding_mask)
        attn_mask = attention_mask(full_mask)

        if num_layers is not None and not 0 <= num_layers <= len(self.encoder.layers):
            raise InputDataError(
                f"num_layers {num_layers} is outside 0..{len(self.encoder.layers)} layers"
            )
        first_token_only = first_token_only and num_layers is None
        parts = self.encoder(vision, text, attn_mask, first_token_only, num_layers)
        if first_token_only:
            num_vision = 1 if vision is not None else 0
            full_mask = None
        return Beit3Output(join_parts(parts), num_vision, full_mask)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter; deterministic under ``torch.manual_seed``.

        BEiT initialisation (paper Sec. 2.3 / BEiT v1): truncated normal (std 0.02) for linear,
        conv and embedding weights, zero biases, unit LayerNorms, then each layer's output
        projections (``out_proj``, ``fc2``) divided by sqrt(2 * layer_index).
        """
        init_modules_(self)
        trunc_normal_(self.vision_embed.cls_token, std=0.02)
        trunc_normal_(self.vision_embed.mask_token, std=0.02)
        for index, module in enumerate(self.encoder.layers, start=1):
            layer = cast(EncoderLayer, module)
            attn, ffn = layer.self_attn, layer.ffn
            for out in (attn.out_proj.A, attn.out_proj.B, ffn.A.fc2, ffn.B.fc2):
                out.weight.mul_(1.0 / math.sqrt(2.0 * index))


def joint_padding_mask(num_vision: int, padding_mask: Tensor) -> Tensor:
    """(B, L) text padding mask -> (B, num_vision + L) bool for the joint sequence, vision tokens
    (first) never padded; True = padding."""
    mask = padding_mask.bool()
    if not num_vision:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], num_vision), mask], dim=1)


def attention_mask(padding_mask: Tensor | None) -> Tensor | None:
    """(B, T) bool padding mask (True = padding) -> (B, 1, 1, T) bool, True = may attend."""
    return None if padding_mask is None else ~padding_mask[:, None, None, :]


@torch.no_grad()
def init_modules_(root: nn.Module) -> None:
    """BEiT initialisation of every submodule of ``root``: truncated normal (std 0.02) for
    linear, conv and embedding weights, zero biases, unit LayerNorms."""
    for module in root.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            trunc_normal_(module.weight, std=0.02)


@torch.no_grad()
def trunc_normal_(tensor: Tensor, std: float = 0.02, bound: float = 2.0) -> Tensor:
    """Fill ``tensor`` from N(0, std^2) truncated at +-bound*std, by inverse CDF.

    torch's own ``trunc_normal_`` samples by rejection, which takes minutes for a base model on
    2 CPU cores; the inverse-CDF draw costs one uniform sample per element.
    """
    if tensor.is_meta:
        return tensor
    lo = 0.5 * (1.0 + math.erf(-bound / math.sqrt(2.0)))
    hi = 1.0 - lo
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_().mul_(std * math.sqrt(2.0))
    return tensor.clamp_(-bound * std, bound * std)
