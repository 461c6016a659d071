import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from beit3.config import create_config
from beit3.pretrain.flops import StreamShape, step_flops, vqkd_encode_flops
from beit3.pretrain.model import Beit3ForPretraining
from beit3.pretrain.vqkd import VQKD, get_vqkd_preset


@pytest.mark.parametrize("kind", ["text", "image", "pair"])
def test_hand_counted_flops_match_torch_flop_counter(kind):
    # Eager attention: FlopCounterMode does not count the CPU SDPA kernel, but counts matmuls.
    cfg = create_config("beit3-tiny", vocab_size=100, img_size=64, attention="eager")
    model = Beit3ForPretraining(cfg, codebook_size=24)
    batch, length, text_slots, image_slots = 3, 9, 4, 6
    images = torch.randn(batch, 3, 64, 64) if kind != "text" else None
    ids = torch.randint(4, 100, (batch, length)) if kind != "image" else None
    pad = torch.zeros(batch, length, dtype=torch.bool) if ids is not None else None
    text_pos = torch.zeros(batch, text_slots, dtype=torch.long) if ids is not None else None
    image_pos = torch.zeros(batch, image_slots, dtype=torch.long) if images is not None else None
    with FlopCounterMode(display=False) as counter:
        model(images, ids, pad, None, text_pos, image_pos)
    shape = StreamShape(
        batch,
        length if ids is not None else 0,
        images is not None,
        text_slots if ids is not None else 0,
        image_slots if images is not None else 0,
    )
    counted = step_flops(cfg, {kind: shape}, codebook_size=24)[kind] / 3  # forward only
    assert counted == counter.get_total_flops()


def test_vqkd_encode_flops_match_torch_flop_counter():
    model = VQKD(get_vqkd_preset("vqkd-tiny"))
    with FlopCounterMode(display=False) as counter:
        model.encode(torch.randn(2, 3, 32, 32))
    # The counter skips the CPU SDPA kernel: 4 T^2 D per layer and image (T = 5, D = 64).
    attention = 2 * 2 * 4 * 5 * 5 * 64
    assert vqkd_encode_flops(model.config, 2) - attention == counter.get_total_flops()


def test_base_step_flops_are_plausible():
    # ~2 x 85M expert parameters per token forward, x3 for training, plus attention and heads.
    cfg = create_config("beit3-base")
    shapes = {"image": StreamShape(1, 0, True, 0, 78)}
    per_image = step_flops(cfg, shapes, 8192)["image"]
    dense = 3 * 2 * 85_146_624 * 197
    assert dense < per_image < 1.1 * dense
