"""Recall@k for image->text and text->image retrieval, computed in blocks.

Protocol (spec 6.4): every image once, every caption once with the index of its image.
Image->text: an image is a hit at k if any of its captions is among the k best texts.
Text->image: a caption is a hit at k if its image is among the k best images.
``average`` is the mean of all reported recalls (the official ``average_score`` for k = 1, 5, 10),
used to pick the best checkpoint. Values are fractions in [0, 1] (the official code prints x100).

Ties are broken by index, as a stable sort would: a negative that scores exactly as high as the
best positive counts as ranked above it only if its index is lower. This is deterministic (the
official ``topk`` is not) and a collapsed model whose scores are all equal gets no free hits.
Scores are never held whole: blocks of ``block_size`` rows, so 5k images x 25k captions need
about ``block_size x 25k`` floats at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["RECALL_KS", "average_recall", "recall_at_k", "retrieval_recall"]

RECALL_KS = (1, 5, 10)

ScoreBlock = Callable[[int, int], Tensor]


def recall_at_k(
    scores: Tensor,
    text_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = RECALL_KS,
    block_size: int = 512,
) -> dict[str, float]:
    """Recalls from a full score matrix.

    Args:
        scores: (N_img, N_txt) similarity of every image to every text.
        text_to_image: (N_txt,) index of each text's image.
        ks: cut-offs.
        block_size: rows scored at a time.

    Returns:
        ``{"i2t_r1": ..., "i2t_r5": ..., "t2i_r1": ..., "average": ...}``. Images without any
        caption are left out of image->text recall.
    """
    scores = scores.float()
    return _recall(
        lambda a, b: scores[a:b],
        lambda a, b: scores[:, a:b].T,
        scores.shape[0],
        scores.shape[1],
        text_to_image,
        ks,
        block_size,
        scores.device,
    )


def retrieval_recall(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = RECALL_KS,
    block_size: int = 512,
) -> dict[str, float]:
    """Recalls from embeddings (dot-product scores), without building the full score matrix.

    Args:
        image_embeds: (N_img, D) unit-norm image embeddings, each image once.
        text_embeds: (N_txt, D) unit-norm text embeddings.
        text_to_image: (N_txt,) index into ``image_embeds`` of each text's image.
    """
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    return _recall(
        lambda a, b: image_embeds[a:b] @ text_embeds.T,  # (b - a, N_txt)
        lambda a, b: text_embeds[a:b] @ image_embeds.T,  # (b - a, N_img)
        image_embeds.shape[0],
        text_embeds.shape[0],
        text_to_image,
        ks,
        block_size,
        image_embeds.device,
    )


def average_recall(metrics: dict[str, float]) -> float:
    """Mean of the recall entries (``i2t_r*`` and ``t2i_r*``) of a metrics dict."""
    values = [v for k, v in metrics.items() if k.startswith(("i2t_r", "t2i_r"))]
    return sum(values) / len(values) if values else float("nan")


def _recall(
    image_rows: ScoreBlock,
    text_rows: ScoreBlock,
    num_images: int,
    num_texts: int,
    text_to_image: Sequence[int] | Tensor,
    ks: Sequence[int],
    block_size: int,
    device: torch.device,
) -> dict[str, float]:
    owner = torch.as_tensor(text_to_image, dtype=torch.long, device=device)
    assert owner.shape == (num_texts,), (
        f"text_to_image has shape {tuple(owner.shape)}, expected ({num_texts},)"
    )
    assert num_texts == 0 or 0 <= int(owner.min()) <= int(owner.max()) < num_images, (
        "text_to_image holds an index outside the images"
    )
    ks = sorted(set(int(k) for k in ks))
    i2t_ranks = torch.cat(
        [
            _image_to_text_ranks(image_rows(a, min(a + block_size, num_images)), a, owner)
            for a in range(0, num_images, block_size)
        ]
        or [owner.new_empty(0)]
    )
    t2i_ranks = torch.cat(
        [
            _text_to_image_ranks(
                text_rows(a, min(a + block_size, num_texts)), owner[a : a + block_size]
            )
            for a in range(0, num_texts, block_size)
        ]
        or [owner.new_empty(0)]
    )
    i2t_ranks = i2t_ranks[i2t_ranks >= 0]  # -1: an image without captions
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = _fraction(i2t_ranks < k)
    for k in ks:
        metrics[f"t2i_r{k}"] = _fraction(t2i_ranks < k)
    metrics["average"] = average_recall(metrics)
    return metrics


def _fraction(hits: Tensor) -> float:
    return float(hits.float().mean()) if hits.numel() else float("nan")


def _image_to_text_ranks(scores: Tensor, first_image: int, owner: Tensor) -> Tensor:
    """(b, N_txt) scores of images first_image.. -> (b,) 0-based rank of each image's best
    caption among the texts (-1 if it has none)."""
    images = torch.arange(first_image, first_image + scores.shape[0], device=scores.device)
    positive = owner[None, :] == images[:, None]  # (b, N_txt)
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
    # Lowest index among the positives reaching the best score (argmax returns the first max).
    first_best = (positive & (scores == best)).to(torch.uint8).argmax(dim=1, keepdim=True)
    columns = torch.arange(scores.shape[1], device=scores.device)[None, :]
    above = (scores > best) | ((scores == best) & (columns < first_best))
    ranks = (above & ~positive).sum(dim=1)
    return torch.where(positive.any(dim=1), ranks, torch.full_like(ranks, -1))


def _text_to_image_ranks(scores: Tensor, owner: Tensor) -> Tensor:
    """(b, N_img) scores of a block of texts and their (b,) images -> (b,) 0-based rank of the
    true image."""
    true_score = scores.gather(1, owner[:, None])  # (b, 1)
    columns = torch.arange(scores.shape[1], device=scores.device)[None, :]
    above = (scores > true_score) | ((scores == true_score) & (columns < owner[:, None]))
    return above.sum(dim=1)
