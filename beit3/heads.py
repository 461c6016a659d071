"""Task models on top of the backbone: the dual encoder, and the dual encoder with a matcher.

The same Multiway weights serve two ways: as a dual encoder (image and text embedded in
separate passes, compared by cosine: fast retrieval) and as a fusion encoder (image patches and
text tokens in one sequence, joint self-attention: a precise image-text matching score).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.config import Beit3Config
from beit3.encoder import run_layers
from beit3.errors import ConfigError
from beit3.model import Beit3Model, attention_mask, joint_padding_mask, trunc_normal_

__all__ = [
    "FUSION_LAYERS",
    "Beit3ForRetrieval",
    "Beit3WithMatcher",
    "FusionLayers",
    "MatchHead",
    "RetrievalOutput",
]

# The matcher's own top layers (see Beit3WithMatcher); 0 = the whole backbone, jointly.
FUSION_LAYERS = 2


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


def _distinct_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, ...) -> (the distinct rows (U, ...), each row's index among them (B,))."""
    rows, index = torch.unique(x.reshape(x.shape[0], -1), dim=0, return_inverse=True)
    return rows.reshape(-1, *x.shape[1:]), index


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


class FusionLayers(nn.Module):
    """The matcher's fusion stage: Multiway layers over the joint image+text sequence and a
    final Multiway LayerNorm, copies of the backbone's top layers when the matcher is made.

    Keys (below the model's ``itm_fusion.``): ``layers.{i}.*`` and ``layer_norm.{A,B}.*``, named
    as in the backbone's ``beit3.encoder``.
    """

    def __init__(self, backbone: Beit3Model, num_layers: int) -> None:
        super().__init__()
        encoder = backbone.encoder
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in encoder.layers[-num_layers:])
        self.layer_norm = copy.deepcopy(encoder.layer_norm)

    @torch.no_grad()
    def copy_from_(self, backbone: Beit3Model) -> None:
        """Set every weight to the backbone's top layers and final LayerNorm."""
        top = backbone.encoder.layers[-len(self.layers) :]
        for own, source in zip(self.layers, top, strict=True):
            own.load_state_dict(source.state_dict())
        if self.layer_norm is not None and backbone.encoder.layer_norm is not None:
            self.layer_norm.load_state_dict(backbone.encoder.layer_norm.state_dict())


class Beit3WithMatcher(Beit3ForRetrieval):
    """The dual encoder plus a fusion-encoder matcher on the same backbone.

    With ``fusion_layers`` = k > 0 (default :data:`FUSION_LAYERS`) the matcher is a late-fusion
    encoder: the image and the text go through the backbone's lower ``depth - k`` layers in
    their own passes (the dual encoder's states, computed without gradient), then through k
    Multiway layers of the matcher's own (``itm_fusion``, copies of the backbone's top k layers
    when the matcher is made) over the joint sequence, where patches and tokens attend to each
    other; the text ``<s>`` is pooled. The matching loss trains only those layers and the head,
    so it cannot undo the dual encoder: measured on the demo model, training matching through
    the shared backbone either stayed at the class prior beside the contrastive loss or, alone,
    destroyed the dual encoder's recall (README, "The matcher"). The BEiT-3 paper's fusion
    encoder likewise has weights of its own in its top layers (vision-language experts).
    With k = 0 every layer is the backbone's, jointly (checkpoints saved before k existed).

    Keys: those of :class:`Beit3ForRetrieval`, ``itm_fusion.*`` (:class:`FusionLayers`, when
    k > 0), ``itm_head.*`` (:class:`MatchHead`), and the buffer ``itm_calibration`` (2,) =
    (scale, bias) of the Platt scaling that turns a raw logit into a calibrated probability,
    ``sigmoid(scale * logit + bias)``; (1, 0) until :meth:`calibrate_` sets it from held-out
    pairs. ``architecture_args`` = ``{"fusion_layers": k}`` (saved in config.json).
    """

    has_matcher = True
    itm_calibration: Tensor
    # What a checkpoint saved before an argument existed was built with (load_checkpoint).
    legacy_architecture_args = {"fusion_layers": 0}

    def __init__(self, config: Beit3Config, fusion_layers: int = FUSION_LAYERS) -> None:
        super().__init__(config)
        if not 0 <= fusion_layers <= config.depth:
            raise ConfigError(
                f"fusion_layers must be in 0..{config.depth} (the depth), got {fusion_layers}"
            )
        self.fusion_layers = fusion_layers
        self.architecture_args = {"fusion_layers": fusion_layers}
        self.itm_fusion = FusionLayers(self.beit3, fusion_layers) if fusion_layers else None
        self.itm_head = MatchHead(config.embed_dim, config.layernorm_eps)
        self.register_buffer("itm_calibration", torch.tensor([1.0, 0.0]))
        self.init_matcher()

    @torch.no_grad()
    def init_matcher(self) -> None:
        """A fresh matcher: the fusion layers copied from the backbone, a random head, no
        calibration."""
        for linear in (self.itm_head.dense, self.itm_head.score):
            trunc_normal_(linear.weight, std=0.02)
            linear.bias.zero_()
        self.itm_head.norm.reset_parameters()
        self.itm_calibration.copy_(torch.tensor([1.0, 0.0]))
        if self.itm_fusion is not None and not self.itm_head.score.weight.is_meta:
            self.itm_fusion.copy_from_(self.beit3)

    def after_transfer_(self, loaded: Collection[str]) -> None:
        """Called when another architecture's weights were loaded (e.g. a dual encoder): a
        matcher that came without them is made from the loaded backbone."""
        if not any(key.startswith(("itm_head.", "itm_fusion.")) for key in loaded):
            self.init_matcher()

    def match_logits(
        self, images: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None
    ) -> Tensor:
        """Raw matcher logits of (image, text) pairs: (B, 3, H, W), (B, L), (B, L) -> (B,).

        The pooled token is the text ``<s>`` of the joint sequence, as in VLMo's matching head
        (the official BEiT-3 VQA / NLVR2 heads pool the vision CLS instead; on the shapes pairs
        the text token learned matching faster: BCE 0.35-0.52 against 0.62 after 300 steps).
        """
        if self.itm_fusion is None:  # every layer jointly, the backbone's own
            hidden = self.beit3(
                images=images, text_ids=text_ids, padding_mask=padding_mask, first_token_only=True
            ).hidden_states  # (B, 2, D): vision CLS, text <s>
            return self.itm_head(hidden[:, 1])
        lower = self.config.depth - self.fusion_layers
        # The dual encoder's states (matching does not train them), once per distinct image and
        # text: a reranked query repeats in every pair, a training image in two of three.
        with torch.no_grad():
            pixels, image_of = _distinct_rows(images)
            vision = self.beit3(images=pixels, num_layers=lower).hidden_states[image_of]
            keys = text_ids if padding_mask is None else torch.cat([text_ids, padding_mask], 1)
            _, text_of = _distinct_rows(keys)
            first = torch.zeros(int(text_of.max()) + 1, dtype=torch.long, device=keys.device)
            first[text_of] = torch.arange(len(text_of), device=keys.device)
            text = self.beit3(
                text_ids=text_ids[first],
                padding_mask=None if padding_mask is None else padding_mask[first],
                num_layers=lower,
            ).hidden_states[text_of]
        mask = None if padding_mask is None else joint_padding_mask(vision.shape[1], padding_mask)
        parts = run_layers(
            self.itm_fusion.layers,
            (vision, text),
            attention_mask(mask),
            first_token_only=True,
            checkpointed=self.config.use_checkpoint and self.training,
        )
        if self.itm_fusion.layer_norm is not None:
            parts = self.itm_fusion.layer_norm.route(parts)
        vision_cls, text_cls = parts
        assert vision_cls is not None and text_cls is not None
        # The vision CLS of the last fusion layer is not pooled; adding it with weight 0 gives
        # the vision expert of that layer (and of the final LayerNorm) a zero gradient instead
        # of none, which DDP requires of every trained parameter.
        return self.itm_head(text_cls[:, 0]) + 0.0 * vision_cls[:, 0].float().sum(-1)

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
