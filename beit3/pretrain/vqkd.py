"""VQ-KD visual tokenizer (BEiT v2): images -> discrete codes, one per patch.

A ViT encoder maps each patch to a vector; a task layer (Linear-Tanh-Linear) projects it to the
codebook dimension; the vector is L2-normalised and replaced by its nearest code in an
L2-normalised codebook (cosine similarity). A small ViT decoder reads the code map and
reconstructs a *teacher's* per-patch features (:mod:`beit3.pretrain.teachers`); the loss is 1 - cosine similarity plus the
commitment term ||sg(code) - z||^2. The codebook is not trained by gradient: it is initialised by
k-means on the first batch and follows an exponential moving average of the vectors assigned to
each code; codes that fall out of use can be re-seeded from the current batch.

Module and buffer names equal those of ``beit2/modeling_vqkd.py`` (``encoder.blocks.0.attn.qkv``,
``quantize.embedding.weight``, ``encode_task_layer.0`` ...), so a released BEiT v2 tokenizer such
as ``vqkd_encoder_base_decoder_1x768x12_clip`` loads through :func:`import_official_vqkd`.

The quantizer's forward has no side effects: the training loop collects
:meth:`NormEMAQuantizer.batch_stats`, sums them over ranks if distributed, and applies
:meth:`NormEMAQuantizer.ema_update` (model code never calls ``torch.distributed``).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.config import ConfigMixin, check_positive_ints
from beit3.errors import CheckpointError, ConfigError, UnknownPresetError
from beit3.model import init_modules_, trunc_normal_

__all__ = [
    "VQKD",
    "NormEMAQuantizer",
    "VqkdConfig",
    "VqkdOutput",
    "get_vqkd_preset",
    "import_official_vqkd",
    "list_vqkd_presets",
    "load_vqkd",
    "save_vqkd",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class VqkdConfig(ConfigMixin):
    """Architecture of a VQ-KD tokenizer. Defaults are BEiT v2's base CLIP tokenizer.

    ``teacher_dim`` is the width of the features the decoder reconstructs: 512 for CLIP ViT-B/16,
    768 for DINO ViT-B/16 or a beit3-base teacher, ``in_chans * patch_size**2`` for pixels.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 768
    decoder_depth: int = 1
    decoder_num_heads: int = 12
    codebook_size: int = 8192
    codebook_dim: int = 32
    teacher_dim: int = 512
    ema_decay: float = 0.99
    layernorm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            (
                "img_size",
                "patch_size",
                "in_chans",
                "embed_dim",
                "depth",
                "num_heads",
                "decoder_embed_dim",
                "decoder_depth",
                "decoder_num_heads",
                "codebook_size",
                "codebook_dim",
                "teacher_dim",
            ),
            "VQ-KD config",
        )
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        for dim, heads in (
            (self.embed_dim, self.num_heads),
            (self.decoder_embed_dim, self.decoder_num_heads),
        ):
            if dim % heads:
                raise ConfigError(f"width {dim} is not divisible by {heads} heads")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


_PRESETS: dict[str, VqkdConfig] = {
    # Tests and CPU demos: matches beit3-tiny's 32-px images and 16-px patches; the pixel teacher
    # gives 3 * 16 * 16 = 768 features per patch. ~0.2M parameters.
    "vqkd-tiny": VqkdConfig(
        img_size=32,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_num_heads=4,
        codebook_size=64,
        codebook_dim=16,
        teacher_dim=768,
    ),
    # BEiT v2 releases: vqkd_encoder_base_decoder_{1x,3x}768x12_clip and ..._1x768x12_dino.
    "vqkd-base": VqkdConfig(),
    "vqkd-base-3x": VqkdConfig(decoder_depth=3),
    "vqkd-base-dino": VqkdConfig(teacher_dim=768),
}


def list_vqkd_presets() -> list[str]:
    return sorted(_PRESETS)


def get_vqkd_preset(name: str, **overrides: Any) -> VqkdConfig:
    """The VQ-KD config ``name`` with validated ``overrides``."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownPresetError(
            f"unknown VQ-KD preset {name!r}{hint} (known: {', '.join(list_vqkd_presets())})"
        )
    return _PRESETS[name].replace(**overrides) if overrides else _PRESETS[name]


# ViT pieces (official key names: patch_embed.proj, blocks.i.attn.qkv / q_bias / v_bias ...) -----


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # BEiT's qkv bias: q and v have one, k has none.
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.view(batch, length, 3, self.num_heads, -1).permute(
            2, 0, 3, 1, 4
        )  # (3, B, H, T, hd)
        ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(ctx.transpose(1, 2).reshape(batch, length, dim))  # (B, T, D)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)


class _VisionTransformer(nn.Module):
    """BEiT v2's ViT as configured for VQ-KD: absolute positions, mean-pooling layout (final
    norm = ``fc_norm`` on the patch tokens), no head. Returns the patch tokens (B, N, D)."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        eps: float,
    ) -> None:
        super().__init__()
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = _PatchEmbed(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:])

    @torch.no_grad()
    def init_weights(self) -> None:
        init_modules_(self)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for index, module in enumerate(self.blocks, start=1):  # BEiT's fix_init_weight
            block = cast(_Block, module)
            block.attn.proj.weight.div_(math.sqrt(2.0 * index))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * index))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()


# The quantizer ----------------------------------------------------------------------------


class _Codebook(nn.Module):
    """Holds the codebook as buffers named as in the official ``EmbeddingEMA``."""

    weight: Tensor
    initted: Tensor

    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_codes, dim))
        self.register_buffer("initted", torch.zeros(1))


class NormEMAQuantizer(nn.Module):
    """Nearest-code lookup in an L2-normalised codebook with EMA updates (``NormEMAVectorQuantizer``).

    Buffers: ``embedding.weight`` (K, d) unit rows; ``embedding.initted`` (1,) 1 after k-means;
    ``cluster_size`` (K,) EMA of how many vectors each code received per step.
    """

    cluster_size: Tensor

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, beta: float = 1.0) -> None:
        super().__init__()
        self.num_codes, self.dim, self.decay, self.beta = num_codes, dim, decay, beta
        self.embedding = _Codebook(num_codes, dim)
        self.register_buffer("cluster_size", torch.zeros(num_codes))

    @property
    def is_initialized(self) -> bool:
        return bool(self.embedding.initted.item())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Quantize.

        Args:
            z: (B, N, d) float vectors (normalised here).

        Returns:
            (straight-through codes (B, N, d), code ids (B, N) long, commitment loss (0-dim),
            normalised z (B, N, d)).
        """
        with torch.autocast(z.device.type, enabled=False):  # the lookup stays in fp32
            z = F.normalize(z.float(), dim=-1)
            codebook = self.embedding.weight
            # On the unit sphere, the nearest code is the one with the largest dot product.
            codes = torch.argmax(z @ codebook.t(), dim=-1)  # (B, N)
            z_q = F.embedding(codes, codebook)  # (B, N, d)
            commit = self.beta * F.mse_loss(z_q.detach(), z)
            return z + (z_q - z).detach(), codes, commit, z

    @torch.no_grad()
    def batch_stats(self, z: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Per-code counts (K,) and sums of assigned vectors (K, d) of one batch (sum over ranks
        before :meth:`ema_update` when distributed)."""
        flat, ids = z.detach().reshape(-1, self.dim).float(), codes.reshape(-1)
        # index_add_ rather than bincount: bincount reads the max id back to the host (a sync).
        counts = torch.zeros(self.num_codes, device=z.device).index_add_(
            0, ids, torch.ones_like(ids, dtype=torch.float32)
        )
        sums = torch.zeros(self.num_codes, self.dim, device=z.device).index_add_(0, ids, flat)
        return counts, sums

    @torch.no_grad()
    def ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """Move each used code toward the normalised mean of its vectors (official norm-EMA)."""
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        used = counts > 0
        means = F.normalize(sums / counts.clamp(min=1).unsqueeze(1), dim=-1)
        weight = self.embedding.weight
        target = torch.where(used.unsqueeze(1), means, weight)
        weight.mul_(self.decay).add_(target, alpha=1 - self.decay)
        weight.copy_(F.normalize(weight, dim=-1))

    @torch.no_grad()
    def kmeans_init_(
        self, samples: Tensor, iters: int = 10, generator: torch.Generator | None = None
    ) -> None:
        """Initialise the codebook by spherical k-means on ``samples`` (M, d)."""
        samples = F.normalize(samples.detach().reshape(-1, self.dim).float(), dim=-1)
        means = _sample_rows(samples, self.num_codes, generator)
        for _ in range(iters):
            assign = torch.argmax(samples @ means.t(), dim=-1)
            counts = torch.bincount(assign, minlength=self.num_codes)
            sums = torch.zeros_like(means).index_add_(0, assign, samples)
            new = F.normalize(sums / counts.clamp(min=1).unsqueeze(1).float(), dim=-1)
            means = torch.where((counts > 0).unsqueeze(1), new, means)
        self.embedding.weight.copy_(means)
        self.cluster_size.copy_(
            torch.bincount(
                torch.argmax(samples @ means.t(), dim=-1), minlength=self.num_codes
            ).float()
        )
        self.embedding.initted.fill_(1.0)

    @torch.no_grad()
    def reseed_dead_codes_(
        self,
        samples: Tensor,
        counts: Tensor,
        min_count: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> int:
        """Replace the codes that received fewer than ``min_count`` vectors (``counts`` (K,),
        e.g. summed over the last few hundred steps and all ranks) by random ``samples``.

        Returns:
            How many codes were re-seeded.
        """
        dead = counts.to(self.embedding.weight.device) < min_count
        count = int(dead.sum())
        if count:
            samples = F.normalize(samples.detach().reshape(-1, self.dim).float(), dim=-1)
            weight = self.embedding.weight
            weight[dead] = _sample_rows(samples, count, generator).to(weight.device)
        return count


def _sample_rows(samples: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
    n = samples.shape[0]
    if n >= num:
        index = torch.randperm(n, generator=generator)[:num]
    else:
        index = torch.randint(0, n, (num,), generator=generator)
    return samples[index.to(samples.device)]


# The tokenizer ----------------------------------------------------------------------------


class VqkdOutput(NamedTuple):
    """loss = rec_loss + commit_loss (0-dim); codes (B, N) long; z (B, N, d) normalised encoder
    vectors (for the EMA statistics)."""

    loss: Tensor
    rec_loss: Tensor
    commit_loss: Tensor
    codes: Tensor
    z: Tensor


class VQKD(nn.Module):
    """VQ-KD tokenizer.

    Args:
        config: architecture (see :func:`get_vqkd_preset`).
    """

    def __init__(self, config: VqkdConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = _VisionTransformer(
            c.img_size,
            c.patch_size,
            c.in_chans,
            c.embed_dim,
            c.depth,
            c.num_heads,
            c.mlp_ratio,
            c.layernorm_eps,
        )
        self.decoder = _VisionTransformer(
            c.grid_size,
            1,
            c.codebook_dim,
            c.decoder_embed_dim,
            c.decoder_depth,
            c.decoder_num_heads,
            c.mlp_ratio,
            c.layernorm_eps,
        )
        self.quantize = NormEMAQuantizer(c.codebook_size, c.codebook_dim, c.ema_decay)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(c.embed_dim, c.embed_dim), nn.Tanh(), nn.Linear(c.embed_dim, c.codebook_dim)
        )
        self.decode_task_layer = nn.Sequential(
            nn.Linear(c.decoder_embed_dim, c.decoder_embed_dim),
            nn.Tanh(),
            nn.Linear(c.decoder_embed_dim, c.teacher_dim),
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic under ``torch.manual_seed``; the codebook waits for k-means."""
        self.encoder.init_weights()
        self.decoder.init_weights()
        for layer in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=0.02)
                layer.bias.zero_()

    def _check(self, images: Tensor) -> None:
        size = self.config.img_size
        if images.ndim != 4 or images.shape[-2:] != (size, size):
            raise ConfigError(
                f"VQ-KD got images of shape {tuple(images.shape)}; it expects (B, 3, {size}, "
                f"{size}): the tokenizer's img_size must equal the model's"
            )

    def encode_vectors(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] (mean = std = 0.5) -> (B, N, d) pre-quantization vectors."""
        self._check(images)
        features = self.encoder(images)  # (B, N, D)
        # The official code runs the task layer in fp32 (autocast off).
        with torch.autocast(images.device.type, enabled=False):
            return self.encode_task_layer(features.float())

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed images -> (B, N) long code ids (row-major patches).

        The codebook must be trained (:func:`load_vqkd` checks it once; no check here, because
        reading a device flag would stall the training step).
        """
        _, codes, _, _ = self.quantize(self.encode_vectors(images))
        return codes

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, N, d) quantized vectors -> (B, N, teacher_dim) reconstructed teacher features."""
        g = self.config.grid_size
        code_map = z_q.transpose(1, 2).reshape(z_q.shape[0], -1, g, g)  # (B, d, g, g)
        return self.decode_task_layer(self.decoder(code_map.to(z_q.dtype)))

    def forward(self, images: Tensor, targets: Tensor) -> VqkdOutput:
        """Training forward.

        Args:
            images: (B, 3, H, W) preprocessed images.
            targets: (B, N, teacher_dim) the teacher's per-patch features.
        """
        z = self.encode_vectors(images)  # the caller runs quantize.kmeans_init_ once before
        z_q, codes, commit, z_norm = self.quantize(z)
        rec = self.decode(z_q)
        if rec.shape != targets.shape:
            raise ConfigError(
                f"teacher features have shape {tuple(targets.shape)}, the decoder "
                f"makes {tuple(rec.shape)}: set teacher_dim to the teacher's width"
            )
        cosine = F.cosine_similarity(rec.float(), targets.float(), dim=-1, eps=1e-6)
        rec_loss = (1.0 - cosine).mean()
        return VqkdOutput(rec_loss + commit, rec_loss, commit, codes, z_norm)


# Saving and loading -------------------------------------------------------------------------


def save_vqkd(model: VQKD, path: str | Path, *, teacher: str = "") -> Path:
    """Write ``config.json`` + ``model.safetensors`` to the directory ``path`` (atomically)."""
    from safetensors.torch import save_file

    from beit3.checkpoint import replace_dir

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if any(k.startswith(("module.", "_orig_mod.")) for k in state):
            raise CheckpointError("save the unwrapped VQ-KD module, not a DDP/compiled wrapper")
        save_file(
            state,
            str(tmp / "model.safetensors"),
            metadata={"format_version": str(FORMAT_VERSION), "kind": "vqkd"},
        )
        (tmp / "config.json").write_text(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "kind": "vqkd",
                    "config": model.config.to_dict(),
                    "teacher": teacher,
                },
                indent=2,
            )
            + "\n"
        )
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved VQ-KD tokenizer to %s", path)
    return path


def load_vqkd(path: str | Path, device: str | torch.device = "cpu") -> VQKD:
    """Load a VQ-KD directory written by :func:`save_vqkd` (strictly), in eval mode."""
    from safetensors.torch import load_file

    from beit3.checkpoint import load_state_dict_checked

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(
            f"{path} is not a VQ-KD tokenizer directory (needs config.json and "
            "model.safetensors; train one with 'beit3 tokenizer train-visual')"
        )
    meta = json.loads((path / "config.json").read_text())
    if meta.get("kind") != "vqkd":
        raise CheckpointError(
            f"{path / 'config.json'} describes a {meta.get('kind') or 'BEiT-3'} "
            "checkpoint, not a VQ-KD tokenizer"
        )
    try:
        config = VqkdConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None
    model = VQKD(config)
    load_state_dict_checked(model, load_file(str(path / "model.safetensors")), source=str(path))
    if not model.quantize.is_initialized:
        raise CheckpointError(
            f"{path}: the codebook was never initialised (saved before the "
            "first training step); train the tokenizer further"
        )
    return model.to(device).eval()


# Keys of a released BEiT v2 training checkpoint that the tokenizer does not use: the frozen
# teacher, its input scaling, and EmbeddingEMA's unused cluster_size / embed_avg copies.
_OFFICIAL_DROP = (
    "teacher_model.",
    "scaling_layer.",
    "loss",
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
)


def import_official_vqkd(
    pth: str | Path, output: str | Path, *, preset: str = "vqkd-base", **overrides: Any
) -> Path:
    """Convert a released BEiT v2 tokenizer (e.g. ``vqkd_encoder_base_decoder_1x768x12_clip.pth``).

    Key names match one to one; the teacher and the unused EMA copies are dropped; the official
    ``quantize.embedding.weight`` (an ``nn.Parameter`` there) becomes our buffer of the same name.
    Loads with ``torch.load(weights_only=True)``: plain tensors only.
    """
    from beit3.checkpoint import load_state_dict_checked

    try:
        raw = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors differ by torch version
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{pth}: cannot read as a weights-only PyTorch file ({reason})"
        ) from None
    for key in ("model", "state_dict", "module"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    state = {
        k: v.float()
        for k, v in raw.items()
        if isinstance(v, Tensor) and not k.startswith(_OFFICIAL_DROP)
    }
    if "quantize.embedding.initted" not in state:
        state["quantize.embedding.initted"] = torch.ones(1)
    state["quantize.embedding.initted"] = state["quantize.embedding.initted"].reshape(1)
    model = VQKD(get_vqkd_preset(preset, **overrides))
    load_state_dict_checked(
        model,
        state,
        source=str(pth),
        preset=preset,
        allow_missing=lambda k: k == "quantize.cluster_size",
    )
    return save_vqkd(model, output, teacher=f"official:{Path(pth).name}")
