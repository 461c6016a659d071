"""Masks for masked data modeling: BEiT block-wise image masks and random text masks.

Both work per sample with an explicit ``numpy.random.Generator``, so a sample's mask depends only
on its own seed (not on the batch it lands in or the number of processes), and a resumed run
draws the same masks again. Masks are made on the CPU, in the data loader, where their sizes are
known without a device sync; :func:`compact_positions` turns them into fixed-size index tensors
that the pretraining heads gather from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from beit3.errors import ConfigError
from beit3.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = [
    "IGNORE_INDEX",
    "BlockMasking",
    "TextMask",
    "compact_positions",
    "mask_text",
    "mask_text_row",
]

# Target value for positions that do not count (torch's cross_entropy default ignore_index).
IGNORE_INDEX = -100


class BlockMasking:
    """BEiT block-wise masking of a patch grid (BEiT / BEiT v2 ``MaskingGenerator``).

    Blocks are rectangles with an area uniform in [min_block, remaining budget] and a log-uniform
    aspect ratio in [min_aspect, 1 / min_aspect], added until the budget is reached (up to 10
    tries per block, as the official code); then single patches are flipped at random so every
    mask has exactly ``num_masked`` patches.

    Args:
        grid_size: patches per side (14 for 224 / 16), or (height, width).
        mask_ratio: fraction of patches to mask when ``num_masked`` is not given (BEiT-3: 0.4).
        num_masked: exact number of masked patches (overrides ``mask_ratio``).
        min_block: smallest block in patches (BEiT v2: 16); clamped to ``num_masked`` so tiny
            grids (2 x 2, 4 x 4) still work.
        max_block: largest block in patches; default ``num_masked``.
        min_aspect: smallest aspect ratio h / w of a block (the largest is its inverse).
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        mask_ratio: float = 0.4,
        num_masked: int | None = None,
        min_block: int = 16,
        max_block: int | None = None,
        min_aspect: float = 0.3,
    ) -> None:
        self.height, self.width = (
            (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        )
        num_patches = self.height * self.width
        if num_patches <= 0:
            raise ConfigError(f"grid_size must be positive, got {grid_size}")
        if num_masked is None:
            if not 0.0 <= mask_ratio <= 1.0:
                raise ConfigError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
            num_masked = int(round(mask_ratio * num_patches))
        if not 0 <= num_masked <= num_patches:
            raise ConfigError(f"num_masked {num_masked} is outside [0, {num_patches}]")
        if not 0.0 < min_aspect <= 1.0:
            raise ConfigError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.num_patches = num_patches
        self.num_masked = num_masked
        self.min_block = max(1, min(min_block, num_masked))
        self.max_block = num_masked if max_block is None else max_block
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def __repr__(self) -> str:
        return (
            f"BlockMasking({self.height}x{self.width}, {self.num_masked} masked, "
            f"blocks {self.min_block}-{self.max_block})"
        )

    def sample_block(
        self, budget: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int] | None:
        """One candidate block (top, left, h, w) for at most ``budget`` patches, or None."""
        area = rng.uniform(self.min_block, max(budget, self.min_block))
        aspect = math.exp(rng.uniform(*self.log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        # Official rule: a block is strictly smaller than the grid in both directions, except
        # on a 1-wide grid where nothing else is possible.
        if (
            h < 1
            or w < 1
            or not (h < self.height or self.height == 1)
            or not (w < self.width or self.width == 1)
        ):
            return None
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        return top, left, h, w

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        for _ in range(10):
            block = self.sample_block(budget, rng)
            if block is None:
                continue
            top, left, h, w = block
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region[...] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Draw one mask: (H, W) bool, True = masked, exactly ``num_masked`` True."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            budget = min(self.num_masked - count, self.max_block)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        flat = mask.reshape(-1)  # a view: edits below change ``mask``
        if count > self.num_masked:
            on = np.flatnonzero(flat)
            flat[rng.choice(on, count - self.num_masked, replace=False)] = False
        elif count < self.num_masked:
            off = np.flatnonzero(~flat)
            flat[rng.choice(off, self.num_masked - count, replace=False)] = True
        assert int(mask.sum()) == self.num_masked, "block mask count drifted"
        return mask


def mask_text_row(
    text_ids: np.ndarray,
    mask_ratio: float,
    mask_id: int,
    rng: np.random.Generator,
    *,
    special_ids: Sequence[int] = (BOS_ID, EOS_ID, PAD_ID),
    random_ratio: float = 0.0,
    keep_ratio: float = 0.0,
    random_range: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one tokenised text.

    Exactly ``max(1, round(mask_ratio * n))`` of the n maskable tokens (not ``<s>``, ``</s>``,
    padding) are chosen. BEiT-3 replaces each chosen token by the mask id (paper, Sec. 2.3);
    BERT's 80/10/10 is available through ``random_ratio`` / ``keep_ratio`` (0.1 / 0.1).

    Args:
        text_ids: (L,) int token ids.
        mask_ratio: fraction of maskable tokens to choose.
        mask_id: the tokenizer's ``mask_id``.
        rng: this sample's generator.
        special_ids: ids never masked.
        random_ratio: share of chosen tokens replaced by a random id from ``random_range``.
        keep_ratio: share of chosen tokens left unchanged (still predicted).
        random_range: [low, high) of random replacement ids (normal pieces).

    Returns:
        (input ids (L,) int64, chosen (L,) bool).
    """
    ids = np.asarray(text_ids, dtype=np.int64)
    chosen = np.zeros(ids.shape, dtype=bool)
    candidates = np.flatnonzero(~np.isin(ids, np.asarray(special_ids)))
    if mask_ratio <= 0 or candidates.size == 0:
        return ids.copy(), chosen
    count = min(candidates.size, max(1, int(round(mask_ratio * candidates.size))))
    picked = rng.choice(candidates, count, replace=False)
    chosen[picked] = True
    out = ids.copy()
    out[picked] = mask_id
    if random_ratio > 0 or keep_ratio > 0:
        if random_range is None and random_ratio > 0:
            raise ConfigError("random_ratio > 0 needs random_range (the ids of normal pieces)")
        draw = rng.random(count)
        keep = draw < keep_ratio
        rand = (draw >= keep_ratio) & (draw < keep_ratio + random_ratio)
        out[picked[keep]] = ids[picked[keep]]
        if rand.any():
            assert random_range is not None, "random_range checked above"
            out[picked[rand]] = rng.integers(random_range[0], random_range[1], int(rand.sum()))
    return out, chosen


class TextMask(NamedTuple):
    """input_ids (B, L) long with masked tokens replaced; mask (B, L) bool, True = predicted;
    targets (B, L) long: the original ids where masked, ``IGNORE_INDEX`` elsewhere."""

    input_ids: Tensor
    mask: Tensor
    targets: Tensor


def mask_text(
    text_ids: Tensor,
    mask_ratio: float,
    mask_id: int,
    rngs: Sequence[np.random.Generator],
    **kwargs: Any,
) -> TextMask:
    """Mask a padded batch row by row (one generator per row); see :func:`mask_text_row`.

    Args:
        text_ids: (B, L) long, padded with ``<pad>`` (id 1).
        mask_ratio: fraction of maskable tokens per row (BEiT-3: 0.15 texts, 0.5 pair texts).
        mask_id: the tokenizer's ``mask_id``.
        rngs: B generators.
    """
    if len(rngs) != text_ids.shape[0]:
        raise ConfigError(f"mask_text got {len(rngs)} generators for {text_ids.shape[0]} rows")
    ids = text_ids.cpu().numpy()
    inputs = np.empty_like(ids)
    mask = np.zeros(ids.shape, dtype=bool)
    for row, rng in enumerate(rngs):
        inputs[row], mask[row] = mask_text_row(ids[row], mask_ratio, mask_id, rng, **kwargs)
    targets = np.where(mask, ids, IGNORE_INDEX)
    return TextMask(torch.from_numpy(inputs), torch.from_numpy(mask), torch.from_numpy(targets))


def compact_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Turn a (B, L) bool mask into fixed-size gather indices.

    Runs on the CPU (in the data loader), so the model can gather the masked positions with a
    static shape and no device-to-host sync.

    Returns:
        positions (B, K) long: the masked positions of each row first (ascending), then zeros;
        valid (B, K) bool: which slots are real. K = the largest count in the batch (>= 1).
    """
    mask = mask.cpu().bool()
    counts = mask.sum(dim=1)
    width = max(1, int(counts.max())) if mask.numel() else 1
    # A stable descending sort of the mask puts masked positions first, in order.
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
    positions = order[:, :width].clone()
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)  # (B, K)
    positions[~valid] = 0
    return positions, valid
