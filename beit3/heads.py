"""Task models on top of the backbone: the dual encoder, and the dual encoder with a matcher.

The same Multiway weights serve two ways: as a dual encoder (image and text embedded in
separate passes, compared by cosine: fast retrieval) and as a fusion encoder (image patches and
text tokens in one sequence, joint self-attention: a precise image-text matching score).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.config import Beit3Config
from beit3.model import Beit3Model, trunc_normal_

__all__ = ["Beit3ForRetrieval", "Beit3WithMatcher", "MatchHead", "RetrievalOutput"]


class RetrievalOutput(NamedTuple):
    """image_embeds (B, D) / text_embeds (B, D): L2-normalised float32 (None if not given);
    logit_scale: the learned log temperature (0-dim), for the contrastive loss;
    match_logits (P,): raw matcher logits of the ``match_*`` pairs (None if none were given)."""

    image_embeds: Tensor | None
    text_embeds: Tensor | None
    logit_scale: Tensor
    match_logits: Tensor | None = None


class Beit3ForRetrieval(nn.Module):
    """Dual encoder, keys as in the official ``BEiT3ForRetrieval``.

    Keys: ``beit3.*`` (backbone), ``vision_head.weight`` (D, D), ``language_head.weight`` (D, D),
    ``logit_scale`` (0-dim). Images and texts go through *separate* single-modality passes; each
    pools token 0 (vision CLS / text ``<s>``, after the final LayerNorm), projects it with a
    bias-free head and L2-normalises it.
    """

    has_matcher = False

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


class MatchHead(nn.Module):
    """Image-text matching head: the pooler of the official NLVR2 / VQA heads (LayerNorm,
    Linear, tanh) on a pooled token of the joint sequence, then one logit.

    Keys (below the model's ``itm_head.``): ``norm.weight``/``.bias`` (D), ``dense.weight``
    (D, D) / ``.bias`` (D), ``score.weight`` (1, D) / ``.bias`` (1).
    """

    def __init__(self, embed_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.score = nn.Linear(embed_dim, 1)

    def forward(self, pooled: Tensor) -> Tensor:
        """(B, D) -> (B,) float32 logits."""
        return self.score(torch.tanh(self.dense(self.norm(pooled)))).squeeze(-1).float()


class Beit3WithMatcher(Beit3ForRetrieval):
    """The dual encoder plus a fusion-encoder matcher on the same backbone.

    Keys: those of :class:`Beit3ForRetrieval`, ``itm_head.*`` (:class:`MatchHead`), and the
    buffer ``itm_calibration`` (2,) = (scale, bias) of the Platt scaling that turns a raw logit
    into a calibrated probability, ``sigmoid(scale * logit + bias)``; (1, 0) until
    :meth:`calibrate_` sets it from held-out pairs.
    """

    has_matcher = True
    itm_calibration: Tensor

    def __init__(self, config: Beit3Config) -> None:
        super().__init__(config)
        self.itm_head = MatchHead(config.embed_dim, config.layernorm_eps)
        self.register_buffer("itm_calibration", torch.tensor([1.0, 0.0]))
        self.init_matcher()

    @torch.no_grad()
    def init_matcher(self) -> None:
        for linear in (self.itm_head.dense, self.itm_head.score):
            trunc_normal_(linear.weight, std=0.02)
            linear.bias.zero_()
        self.itm_head.norm.reset_parameters()
        self.itm_calibration.copy_(torch.tensor([1.0, 0.0]))

    def match_logits(
        self, images: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None
    ) -> Tensor:
        """Raw matcher logits of (image, text) pairs: (B, 3, H, W), (B, L), (B, L) -> (B,).

        One joint forward: patches and tokens attend to each other in every layer. The pooled
        token is the text ``<s>`` of the joint sequence, as in VLMo's matching head (the
        official BEiT-3 VQA / NLVR2 heads pool the vision CLS instead; on the shapes pairs the
        text token learned matching faster: BCE 0.35-0.52 against 0.62 after 300 steps).
        """
        hidden = self.beit3(
            images=images, text_ids=text_ids, padding_mask=padding_mask, first_token_only=True
        ).hidden_states  # (B, 2, D): vision CLS, text <s>
        return self.itm_head(hidden[:, 1])

    def match_probability(
        self, images: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None
    ) -> Tensor:
        """Calibrated probability that each pair matches: (B,) float32 in [0, 1]."""
        return self.calibrated(self.match_logits(images, text_ids, padding_mask))

    def calibrated(self, logits: Tensor) -> Tensor:
        """Raw logits -> calibrated probabilities."""
        scale, bias = self.itm_calibration.float()
        return torch.sigmoid(scale * logits.float() + bias)

    @torch.no_grad()
    def calibrate_(self, scale: float, bias: float) -> None:
        self.itm_calibration.copy_(torch.tensor([scale, bias]))

    def forward(  # type: ignore[override]
        self,
        images: Tensor | None = None,
        text_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        match_images: Tensor | None = None,
        match_text_ids: Tensor | None = None,
        match_padding_mask: Tensor | None = None,
    ) -> RetrievalOutput:
        """The dual-encoder outputs of :class:`Beit3ForRetrieval`, plus the raw matcher logits
        of the ``match_*`` pairs when given (one module call, for DDP / FSDP)."""
        out = super().forward(images, text_ids, padding_mask)
        if match_images is None or match_text_ids is None:
            return out
        logits = self.match_logits(match_images, match_text_ids, match_padding_mask)
        return out._replace(match_logits=logits)
