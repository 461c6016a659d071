import math

import numpy as np
import pytest
import torch

from beit3.errors import ConfigError
from beit3.pretrain.masking import (
    IGNORE_INDEX,
    BlockMasking,
    compact_positions,
    mask_text,
    mask_text_row,
)
from beit3.tokenizer import BOS_ID, EOS_ID, PAD_ID


def _masked_neighbours(mask: np.ndarray) -> float:
    """Mean number of masked 4-neighbours of a masked patch."""
    padded = np.pad(mask, 1)
    neighbours = (
        padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    )
    return float(neighbours[mask].mean())


def test_block_masks_have_exact_count_and_are_blocky_at_14x14():
    masking = BlockMasking(14, mask_ratio=0.4)
    rng = np.random.default_rng(0)
    masks = np.stack([masking(rng) for _ in range(500)])
    assert masking.num_masked == 78  # round(0.4 * 196)
    assert (masks.reshape(500, -1).sum(1) == 78).all()
    # Blocks: a masked patch has ~3 masked neighbours; a random 40% mask gives ~1.5.
    block = np.mean([_masked_neighbours(m) for m in masks])
    random_masks = [rng.permutation(196).reshape(14, 14) < 78 for _ in range(200)]
    scattered = np.mean([_masked_neighbours(m) for m in random_masks])
    assert block > 2.6 and scattered < 1.7, (block, scattered)
    # Every patch gets masked sometimes, the centre more often than the corners (blocks).
    freq = masks.mean(0)
    assert freq.min() > 0.02 and freq[5:9, 5:9].mean() > freq[[0, 0, 13, 13], [0, 13, 0, 13]].mean()


def test_block_shapes_follow_the_area_and_aspect_ranges():
    masking = BlockMasking(14, mask_ratio=0.4)
    rng = np.random.default_rng(1)
    blocks = [b for _ in range(3000) if (b := masking.sample_block(78, rng)) is not None]
    assert len(blocks) > 2000
    areas = np.array([h * w for _, _, h, w in blocks])
    log_aspect = np.array([math.log(h / w) for _, _, h, w in blocks])
    assert areas.min() >= 12 and areas.max() <= 100  # 16..78 up to rounding of h and w
    # Log-uniform in [log 0.3, log 1/0.3]: symmetric around 0, bounded up to rounding.
    assert abs(log_aspect.mean()) < 0.1
    assert log_aspect.min() > math.log(0.3) - 0.45 and log_aspect.max() < -math.log(0.3) + 0.45
    for top, left, h, w in blocks:
        assert top >= 0 and top + h <= 14 and left >= 0 and left + w <= 14


@pytest.mark.parametrize(("grid", "expected"), [(2, 2), (4, 6)])
def test_block_masks_work_on_tiny_grids(grid, expected):
    masking = BlockMasking(grid, mask_ratio=0.4)
    rng = np.random.default_rng(2)
    masks = np.stack([masking(rng) for _ in range(300)]).reshape(300, -1)
    assert (masks.sum(1) == expected).all()
    assert masks.mean(0).min() > 0.1  # every patch can be masked


def test_block_masking_rejects_bad_ratios():
    with pytest.raises(ConfigError, match="mask_ratio"):
        BlockMasking(14, mask_ratio=1.5)


def test_text_masking_ratio_and_specials():
    rng = np.random.default_rng(3)
    ratios = []
    for _ in range(400):
        n = int(rng.integers(5, 40))
        ids = np.array([BOS_ID, *rng.integers(4, 300, n), EOS_ID, PAD_ID, PAD_ID])
        out, chosen = mask_text_row(ids, 0.15, 301, rng)
        assert not chosen[[0, n + 1, n + 2, n + 3]].any()  # <s>, </s>, padding
        assert (out[chosen] == 301).all() and (out[~chosen] == ids[~chosen]).all()
        assert chosen.sum() == max(1, round(0.15 * n))
        ratios.append(chosen.sum() / n)
    assert abs(np.mean(ratios) - 0.15) < 0.03


def test_text_masking_bert_mode_mixes_mask_random_and_kept():
    rng = np.random.default_rng(4)
    ids = np.array([BOS_ID, *range(10, 210), EOS_ID])
    kinds = np.zeros(3)
    for _ in range(50):
        out, chosen = mask_text_row(
            ids, 0.5, 999, rng, random_ratio=0.1, keep_ratio=0.1, random_range=(4, 300)
        )
        picked_in, picked_orig = out[chosen], ids[chosen]
        kinds += [
            (picked_in == 999).sum(),
            (picked_in == picked_orig).sum(),
            ((picked_in != 999) & (picked_in != picked_orig)).sum(),
        ]
    share = kinds / kinds.sum()
    assert abs(share[0] - 0.8) < 0.03 and abs(share[1] - 0.1) < 0.03 and share[2] > 0.07


def test_mask_text_batch_targets_only_at_masked_positions():
    ids = torch.tensor(
        [[BOS_ID, 10, 11, 12, 13, EOS_ID], [BOS_ID, 20, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]
    )
    rngs = [np.random.default_rng(i) for i in range(2)]
    out = mask_text(ids, 0.5, 99, rngs)
    assert out.mask.sum(1).tolist() == [2, 1]
    assert (out.targets[out.mask] == ids[out.mask]).all()
    assert (out.targets[~out.mask] == IGNORE_INDEX).all()
    assert (out.input_ids[out.mask] == 99).all()
    # The same generators give the same masks (masks depend on the sample's seed only).
    again = mask_text(ids, 0.5, 99, [np.random.default_rng(i) for i in range(2)])
    assert torch.equal(again.mask, out.mask)


def test_compact_positions_lists_masked_positions_first():
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    positions, valid = compact_positions(mask)
    assert positions.tolist() == [[1, 3, 4], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
