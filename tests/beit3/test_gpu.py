"""GPU checks (skipped without CUDA; bench/gpu_check.sh runs them on the lent H200)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from beit3 import create_config
from beit3.heads import Beit3ForRetrieval
from tests.beit3.test_model import _inputs, _randomize
from tests.reference import build_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(preset):
    cfg = create_config(preset)
    with torch.device("meta"):
        ours = Beit3ForRetrieval(cfg)
    ours = ours.to_empty(device="cpu").eval()
    _randomize(ours)
    ref = build_reference(cfg, ours.state_dict())
    return cfg, ours.cuda(), ref.cuda()


def test_fp32_parity_on_cuda():
    cfg, ours, ref = _pair("beit3-base")
    images, ids, pad = (t.cuda() for t in _inputs(cfg, batch=2))
    with torch.no_grad():
        a = ours.beit3(images=images, text_ids=ids, padding_mask=pad).hidden_states
        b = ref.beit3(textual_tokens=ids, visual_tokens=images, text_padding_position=pad)[
            "encoder_out"
        ]
    assert (a - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1.0)


def test_bf16_embeddings_track_fp32_and_the_reference():
    cfg, ours, ref = _pair("beit3-base")
    images, ids, pad = (t.cuda() for t in _inputs(cfg, batch=4))
    with torch.no_grad():
        fp32 = ours.encode_image(images), ours.encode_text(ids, pad)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = ours.encode_image(images), ours.encode_text(ids, pad)
            ref_bf16 = ref.encode_image(images).float(), ref.encode_text(ids, pad).float()
    for a, b, r in zip(fp32, bf16, ref_bf16, strict=True):
        assert b.dtype == torch.float32
        assert (a * b).sum(-1).min().item() > 0.99  # cosine to fp32
        assert (r * b).sum(-1).min().item() > 0.99  # cosine to the official code in bf16


def test_flash_attention_kernel_serves_image_encoding():
    cfg, ours, _ = _pair("beit3-base")
    images = _inputs(cfg, batch=4)[0].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run this
            flash = ours.encode_image(images)
        with sdpa_kernel([SDPBackend.MATH]):
            math = ours.encode_image(images)
    assert (flash * math).sum(-1).min().item() > 0.999
