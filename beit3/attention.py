"""Joint multi-head self-attention with Multiway projections and Sub-LN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.multiway import Multiway, Parts, join_parts, split_parts

__all__ = ["MultiwayAttention"]


class MultiwayAttention(nn.Module):
    """Self-attention over the concatenated vision + text sequence.

    q/k/v/out projections and the inner LayerNorm are Multiway (per-modality experts); the
    attention itself is joint, which is where cross-modal fusion happens. The inner LayerNorm
    (``inner_attn_ln``) sits between the attention context and ``out_proj`` (Magneto Sub-LN).

    Args:
        embed_dim: model width D.
        num_heads: number of heads H (D % H == 0).
        eps: LayerNorm epsilon.
        impl: ``"sdpa"`` (``F.scaled_dot_product_attention``: flash / memory-efficient kernels)
            or ``"eager"`` (explicit softmax in fp32, as the official code does).
    """

    def __init__(self, embed_dim: int, num_heads: int, eps: float, impl: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.impl = impl
        self.q_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.k_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.v_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.out_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.inner_attn_ln = Multiway(nn.LayerNorm(embed_dim, eps=eps))

    def forward(
        self, parts: Parts, attn_mask: Tensor | None, queries: Parts | None = None
    ) -> Parts:
        """Attend over the joined parts.

        Args:
            parts: (vision (B, Nv, D) or None, text (B, Nt, D) or None): keys and values.
            attn_mask: (B, 1, 1, T) bool, True = may attend; None = attend everywhere.
            queries: the tokens to compute outputs for (default: all of ``parts``); the
                retrieval heads pass only each part's first token in the last layer.

        Returns:
            The attention branch output for the queries, split like them.
        """
        queries = parts if queries is None else queries
        num_vision_q = queries[0].shape[1] if queries[0] is not None else 0
        q = join_parts(self.q_proj.route(queries))
        k = join_parts(self.k_proj.route(parts))
        v = join_parts(self.v_proj.route(parts))
        batch, q_len, dim = q.shape
        kv_len = k.shape[1]
        q = q.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, hd)
        k = k.view(batch, kv_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(batch, kv_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if self.impl == "sdpa":
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            ctx = _eager_attention(q, k, v, attn_mask)
        ctx = ctx.transpose(1, 2).reshape(batch, q_len, dim)  # (B, Tq, D), heads in order
        out = split_parts(ctx, num_vision_q)
        return self.out_proj.route(self.inner_attn_ln.route(out))


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    # The official code scales q after the bias, masks padded keys with -inf and takes the
    # softmax in fp32 before casting back (torchscale multihead_attention.py).
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
    return probs @ v
