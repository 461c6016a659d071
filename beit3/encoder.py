"""The Multiway Transformer encoder: its layers (pre-LN + Sub-LN, decoupled experts) and the
stack that runs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from beit3.attention import MultiwayAttention
from beit3.config import Beit3Config
from beit3.embeddings import PositionTable
from beit3.multiway import Multiway, Parts

__all__ = ["Encoder", "EncoderLayer", "FeedForward", "run_layers"]


class FeedForward(nn.Module):
    """fc1 -> GELU (exact, in fp32) -> Sub-LN over the FFN width -> fc2. One expert's FFN."""

    def __init__(self, embed_dim: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).to(h.dtype)  # official: GELU evaluated in fp32
        return self.fc2(self.ffn_layernorm(h))


class EncoderLayer(nn.Module):
    """One layer: x + Attn(LN(x)), then x + FFN(LN(x)), every LN / Linear per modality.

    ``final_layer_norm`` is the official (fairseq) name of the pre-FFN LayerNorm.
    """

    drop_prob: Tensor

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        ffn_dim: int,
        eps: float,
        drop_path: float,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        self.self_attn_layer_norm = Multiway(nn.LayerNorm(embed_dim, eps=eps))
        self.self_attn = MultiwayAttention(embed_dim, num_heads, eps, impl=attention)
        self.final_layer_norm = Multiway(nn.LayerNorm(embed_dim, eps=eps))
        self.ffn = Multiway(FeedForward(embed_dim, ffn_dim, eps))
        self.drop_path = drop_path
        # A tensor, not a Python float, so torch.compile builds one graph for every layer's rate.
        # Made on the CPU even under a meta-device context: it is not in the state dict, so a
        # checkpoint load cannot fill it in.
        self.register_buffer(
            "drop_prob", torch.tensor(float(drop_path), device="cpu"), persistent=False
        )

    def forward(
        self,
        vision: Tensor | None,
        text: Tensor | None,
        attn_mask: Tensor | None,
        first_token_only: bool = False,
    ) -> Parts:
        """Run the layer.

        Args:
            vision: (B, Nv, D) or None. text: (B, Nt, D) or None.
            attn_mask: (B, 1, 1, T) bool, True = may attend.
            first_token_only: compute outputs only for each part's first token (attending to
                all tokens). Exact, and cheaper, for a last layer whose CLS / <s> is pooled.

        Returns:
            (vision, text) outputs: (B, Nv or 1, D), (B, Nt or 1, D).
        """
        parts: Parts = (vision, text)
        normed = self.self_attn_layer_norm.route(parts)
        if first_token_only:
            parts = (_first(vision), _first(text))
            h = self.self_attn(normed, attn_mask, queries=(_first(normed[0]), _first(normed[1])))
        else:
            h = self.self_attn(normed, attn_mask)
        parts = self._residual(parts, h)
        h = self.ffn.route(self.final_layer_norm.route(parts))
        return self._residual(parts, h)

    def _residual(self, parts: Parts, branch: Parts) -> Parts:
        keep = None
        if self.training and self.drop_path > 0:
            # Stochastic depth drops a whole sample's branch: one draw per sample, shared by
            # its vision and text tokens (timm drop_path, rescaled by 1 / keep).
            ref = next(p for p in parts if p is not None)
            draw = torch.rand(ref.shape[0], 1, 1, device=ref.device)
            keep = (draw >= self.drop_prob).to(ref.dtype) / (1.0 - self.drop_prob).to(ref.dtype)
        out: list[Tensor | None] = []
        for x, b in zip(parts, branch, strict=True):
            if x is None or b is None:
                out.append(None)
            else:
                out.append(x + (b * keep if keep is not None else b))
        return out[0], out[1]


def _first(x: Tensor | None) -> Tensor | None:
    return x[:, :1] if x is not None else None


class Encoder(nn.Module):
    """The layer stack and the final Multiway LayerNorm, plus the position tables.

    The tables live here because the official state dict names them
    ``encoder.embed_positions.{A,B}``, but :class:`beit3.model.Beit3Model` adds them with the
    token embeddings: :meth:`forward` takes inputs that already carry their positions.

    Args:
        config: the architecture (depth, widths, drop path, checkpointing, attention kernel).
    """

    def __init__(self, config: Beit3Config) -> None:
        super().__init__()
        # Row counts match the official tables: vision N + 1 tokens + 2 unused rows; text 1024.
        self.embed_positions = Multiway(
            PositionTable(config.num_vision_tokens + 2, config.embed_dim),
            PositionTable(config.max_text_positions, config.embed_dim),
        )
        # Stochastic depth grows linearly from 0 (first layer) to drop_path_rate (last).
        depth = config.depth
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            EncoderLayer(
                config.embed_dim,
                config.num_heads,
                config.ffn_dim,
                config.layernorm_eps,
                rate,
                attention=config.attention,
            )
            for rate in rates
        )
        self.layer_norm = (
            Multiway(nn.LayerNorm(config.embed_dim, eps=config.layernorm_eps))
            if config.normalize_output
            else None
        )
        self.use_checkpoint = config.use_checkpoint

    def forward(
        self,
        vision: Tensor | None,
        text: Tensor | None,
        attn_mask: Tensor | None,
        first_token_only: bool = False,
        num_layers: int | None = None,
    ) -> Parts:
        """Run every layer, then the final LayerNorm (or, with ``num_layers``, only the first
        ``num_layers`` layers and no LayerNorm: the states a later stage continues from).

        Activation checkpointing (``use_checkpoint``) applies in training mode only.

        Args:
            vision: (B, Nv, D) embedded vision tokens with positions, or None.
            text: (B, Nt, D) embedded text tokens with positions, or None.
            attn_mask: (B, 1, 1, Nv + Nt) bool, True = may attend; None when nothing is padded.
            first_token_only: let the last layer compute only each part's first token (exact
                for pooled CLS / <s> outputs; see :meth:`EncoderLayer.forward`).

        Returns:
            (vision, text): (B, Nv or 1, D), (B, Nt or 1, D); None where the input was None.
        """
        parts = run_layers(
            self.layers,
            (vision, text),
            attn_mask,
            first_token_only and num_layers is None,
            checkpointed=self.use_checkpoint and self.training,
            num_layers=num_layers,
        )
        if self.layer_norm is not None and num_layers is None:
            parts = self.layer_norm.route(parts)
        return parts


def run_layers(
    layers: nn.ModuleList,
    parts: Parts,
    attn_mask: Tensor | None,
    first_token_only: bool = False,
    *,
    checkpointed: bool = False,
    num_layers: int | None = None,
) -> Parts:
    """Run ``layers`` (the first ``num_layers`` of them, default all) over ``parts``; with
    ``first_token_only`` the last one run computes only each part's first token."""
    run = list(layers)[:num_layers]
    for index, layer in enumerate(run):
        first_only = first_token_only and index == len(run) - 1
        if checkpointed:
            parts = checkpoint(layer, *parts, attn_mask, first_only, use_reentrant=False)
        else:
            parts = layer(*parts, attn_mask, first_only)
    return parts
