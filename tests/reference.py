"""The official implementation as a parity reference: PyPI torchscale 0.3.0 plus a thin wrapper.

torchscale imports ``timm.models.layers.drop_path`` only for stochastic depth. timm pulls in
torchvision, which does not import beside the CPU torch, so a stand-in module is registered under
that name first (the function below is timm's drop_path; it is the identity in eval mode).
Install: ``pip install --no-deps torchscale==0.3.0 fairscale==0.4.0`` (``make test`` does).
"""

from __future__ import annotations

import math
import sys
import types

import torch
from torch import nn

from beit3.config import Beit3Config


def _install_stubs() -> None:
    _install_fairscale_stub()
    if "timm.models.layers" in sys.modules:
        return

    def drop_path(x, drop_prob: float = 0.0, training: bool = False):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1 - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    layers.drop_path = drop_path
    timm.models = models
    models.layers = layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def _install_fairscale_stub() -> None:
    """torchscale's encoder imports fairscale's checkpoint_wrapper and wrap at module level but
    calls them only with checkpoint_activations / fsdp, which the parity runs leave off. Where
    fairscale is not installed (it ships only as an sdist), identity stand-ins are enough."""
    try:
        import fairscale.nn  # noqa: F401
    except ImportError:
        fairscale = types.ModuleType("fairscale")
        nn_mod = types.ModuleType("fairscale.nn")
        nn_mod.checkpoint_wrapper = lambda module, *a, **k: module
        nn_mod.wrap = lambda module, *a, **k: module
        fairscale.nn = nn_mod
        sys.modules.update({"fairscale": fairscale, "fairscale.nn": nn_mod})


def encoder_config(cfg: Beit3Config):
    """The torchscale EncoderConfig that the official unilm code builds for ``cfg``."""
    _install_stubs()
    from torchscale.architecture.config import EncoderConfig

    return EncoderConfig(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        vocab_size=cfg.vocab_size,
        multiway=True,
        layernorm_embedding=False,
        normalize_output=cfg.normalize_output,
        no_output_layer=True,
        drop_path_rate=cfg.drop_path_rate,
        encoder_embed_dim=cfg.embed_dim,
        encoder_attention_heads=cfg.num_heads,
        encoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_layers=cfg.depth,
        max_source_positions=cfg.max_text_positions,
        layernorm_eps=cfg.layernorm_eps,
    )


class ReferenceRetrieval(nn.Module):
    """unilm's BEiT3ForRetrieval, minus its loss: torchscale BEiT3 + two heads + logit_scale."""

    def __init__(self, cfg: Beit3Config) -> None:
        super().__init__()
        _install_stubs()
        from torchscale.model.BEiT3 import BEiT3

        self.beit3 = BEiT3(encoder_config(cfg))
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_image(self, images):
        x = self.beit3(textual_tokens=None, visual_tokens=images)["encoder_out"]
        return nn.functional.normalize(self.vision_head(x[:, 0, :]), dim=-1)

    def encode_text(self, text_ids, padding_mask):
        x = self.beit3(
            textual_tokens=text_ids, visual_tokens=None, text_padding_position=padding_mask
        )["encoder_out"]
        return nn.functional.normalize(self.language_head(x[:, 0, :]), dim=-1)


def build_reference(cfg: Beit3Config, state_dict: dict[str, torch.Tensor]) -> ReferenceRetrieval:
    """Build the reference on the meta device (its own init is slow) and load ``state_dict``."""
    with torch.device("meta"):
        ref = ReferenceRetrieval(cfg)
    ref.load_state_dict(state_dict, strict=True, assign=True)
    return ref.eval()
