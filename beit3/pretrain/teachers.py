"""Teachers for VQ-KD training: what the tokenizer's decoder learns to reconstruct, per patch.

A teacher maps preprocessed images (B, 3, H, W) to per-patch features (B, N, C) on the
tokenizer's patch grid and reports ``out_dim``. BEiT v2 used CLIP or DINO; here the choices are
the pixels themselves (no weights needed) or a frozen BEiT-3 vision encoder of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from beit3.errors import ConfigError
from beit3.model import Beit3Model

__all__ = ["Beit3Teacher", "PixelTeacher"]


class PixelTeacher(nn.Module):
    """Teacher without weights: the pixels of each patch, so VQ-KD trains offline from nothing.

    Args:
        patch_size: the tokenizer's patch size.
        norm: ``"none"``: the preprocessed pixels (mean = std = 0.5, so colour survives the cosine
            loss); ``"patch"``: each patch standardised on its own (MAE's normalised pixels:
            texture only, flat patches become zero).
    """

    def __init__(self, patch_size: int, norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "patch"):
            raise ConfigError(f"pixel teacher norm must be 'none' or 'patch', got {norm!r}")
        self.patch_size, self.norm = patch_size, norm

    def out_dim(self, in_chans: int = 3) -> int:
        return in_chans * self.patch_size**2

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, C * P * P), patches row-major, pixels (C, P, P)-ordered."""
        p = self.patch_size
        batch, chans, height, width = images.shape
        x = images.float().reshape(batch, chans, height // p, p, width // p, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), -1)
        if self.norm == "patch":
            x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
        return x


class Beit3Teacher(nn.Module):
    """A frozen BEiT-3 backbone as teacher: the patch tokens of a vision-only pass (B, N, D).

    Args:
        backbone: a ``Beit3Model`` (e.g. ``load_checkpoint(dir).model.beit3``).
    """

    def __init__(self, backbone: Beit3Model) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Beit3Teacher:
        from beit3.checkpoint import load_checkpoint

        return cls(cast(Beit3Model, load_checkpoint(path, device=device).model.beit3))

    def out_dim(self, in_chans: int = 3) -> int:
        return self.backbone.config.embed_dim

    def train(self, mode: bool = True) -> Beit3Teacher:
        return super().train(False)  # always frozen

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images=images).hidden_states[:, 1:]  # drop CLS
