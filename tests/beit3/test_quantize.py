"""int8 dynamic quantisation of the encoders (beit3.quantize)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from beit3 import ConfigError, load_checkpoint
from beit3.quantize import quantize_checkpoint, quantize_model
from beit3.transforms import load_image_tensor

DEMO_IMAGES = Path(__file__).resolve().parents[2] / "demo" / "data" / "emoji" / "images"


def _linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def test_quantize_checkpoint_matches_fp32_on_real_images(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    int8 = quantize_checkpoint(ckpt, "int8")
    assert _linears(int8.model) == []  # every projection, the Multiway experts included
    assert _linears(ckpt.model) != []  # the fp32 checkpoint is left as it was
    assert int8.model_id == ckpt.model_id
    files = sorted(DEMO_IMAGES.glob("*.png"))[:16]
    assert len(files) == 16, f"demo images missing under {DEMO_IMAGES}"
    images = torch.stack([load_image_tensor(f, ckpt.preprocess) for f in files])
    batch = ckpt.tokenizer(["a red circle", "two blue squares on grey", "flag: France"])
    with torch.inference_mode():
        ref_i, q_i = ckpt.model.encode_image(images), int8.model.encode_image(images)
        ref_t = ckpt.model.encode_text(batch.text_ids, batch.padding_mask)
        q_t = int8.model.encode_text(batch.text_ids, batch.padding_mask)
    assert q_i.dtype == torch.float32 and q_i.shape == ref_i.shape
    torch.testing.assert_close(q_i.norm(dim=-1), torch.ones(len(files)))
    cos_i, cos_t = (q_i * ref_i).sum(-1), (q_t * ref_t).sum(-1)
    assert cos_i.min().item() > 0.98, cos_i
    assert cos_t.min().item() > 0.98, cos_t
    assert not torch.equal(q_i, ref_i)  # the int8 path really ran


def test_quantize_refuses_unknown_mode_in_one_line(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ConfigError, match=r"unknown quantisation mode 'int4'; choose one of int8"):
        quantize_checkpoint(ckpt, "int4")
    with pytest.raises(ConfigError) as info:
        quantize_model(ckpt.model, "fp16")
    assert "\n" not in str(info.value)
