"""Model FLOPs of a pretraining step, counted by hand from the shapes (for MFU).

Counts matrix multiplies only (2 FLOPs per multiply-add), as MFU conventions do: per token and
layer, q/k/v/out projections 8 D^2 and the FFN 4 D F (each token passes one expert, so Multiway
costs what a plain Transformer costs); per sequence and layer, attention scores and the weighted
sum 4 T^2 D; the patch embedding 2 (C P^2) D per patch; the heads 2 D V per predicted slot.
Training = 3 x forward (backward = 2 x forward). Activation checkpointing's recomputation is
not counted (that would be hardware FLOPs, not model FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

from beit3.config import Beit3Config
from beit3.pretrain.vqkd import VqkdConfig

__all__ = ["StreamShape", "encoder_flops", "step_flops", "vqkd_encode_flops"]


@dataclass(frozen=True)
class StreamShape:
    """One kind of batch: batch size, text length (0 = no text), whether images are present,
    and how many head slots are computed per sample (text and image)."""

    batch: int
    text_len: int = 0
    images: bool = False
    text_slots: int = 0
    image_slots: int = 0


def encoder_flops(dim: int, ffn: int, depth: int, tokens: int) -> float:
    """Forward FLOPs of ``depth`` pre-LN layers over one sequence of ``tokens``."""
    per_token = 8 * dim * dim + 4 * dim * ffn
    return depth * (tokens * per_token + 4 * tokens * tokens * dim)


def step_flops(
    cfg: Beit3Config,
    streams: dict[str, StreamShape],
    codebook_size: int,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Training FLOPs (forward + backward) of one step, per kind of batch."""
    vocab = vocab_size or cfg.vocab_size
    out = {}
    for kind, s in streams.items():
        tokens = s.text_len + (cfg.num_vision_tokens if s.images else 0)
        forward = encoder_flops(cfg.embed_dim, cfg.ffn_dim, cfg.depth, tokens)
        if s.images:
            forward += 2 * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim * cfg.num_patches
        forward += 2 * cfg.embed_dim * (vocab * s.text_slots + codebook_size * s.image_slots)
        out[kind] = 3.0 * s.batch * forward
    return out


def vqkd_encode_flops(cfg: VqkdConfig, images: int) -> float:
    """Forward FLOPs of ``VQKD.encode`` for ``images`` images (encoder, task layer, lookup)."""
    tokens = cfg.num_patches + 1
    per_image = encoder_flops(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.depth, tokens)
    per_image += 2 * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim * cfg.num_patches
    per_image += (
        cfg.num_patches
        * 2
        * (
            cfg.embed_dim**2
            + cfg.embed_dim * cfg.codebook_dim
            + cfg.codebook_dim * cfg.codebook_size
        )
    )
    return float(images * per_image)
