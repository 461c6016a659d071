"""The fusion-encoder matcher off the training step: hard negatives, calibration, evaluation.

- :func:`mine_hard_negatives`: for each pair of a contrastive batch, one negative text and one
  negative image drawn from the contrastive similarities (softmax sampling, ALBEF-style), the
  positive, other captions of the same image and exact-duplicate captions excluded.
- :func:`matcher_pairs`: held-out pairs and their hard negatives from the dual encoder's top-k,
  scored by the matcher: what calibration is fitted on and measured on.
- :func:`fit_platt`, :func:`expected_calibration_error`, :func:`auroc`,
  :func:`reliability_diagram`: calibration and its measures.
- :func:`reranked_recall`: recall@k of the dual encoder alone and with the top-K reranked by
  the matcher, for the same checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from beit3.data import PairRecord, group_by_image
from beit3.datasets import ImageFiles
from beit3.errors import InputDataError
from beit3.heads import Beit3WithMatcher
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig

__all__ = [
    "HeldOut",
    "MatcherPairs",
    "auroc",
    "encode_held_out",
    "expected_calibration_error",
    "fit_platt",
    "matcher_calibration",
    "matcher_pairs",
    "mine_hard_negatives",
    "reliability_diagram",
    "reranked_recall",
    "row_hashes",
]

logger = logging.getLogger(__name__)


def row_hashes(ids: Tensor, padding_mask: Tensor) -> Tensor:
    """(B, L) token ids -> (B,) int64 hashes that are equal for equal texts (padding ignored)."""
    ids = ids.masked_fill(padding_mask, 0).long()
    weights = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=torch.long)
    weights = (weights * 1_000_003) ** 2 % 2_147_483_647  # fixed odd-ish multipliers per slot
    return ((ids + 1) * weights).sum(dim=1)


def _hash_uniform(seed: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Uniform (0, 1) numbers for (row key, column key) pairs: (B,), (G,) int -> (B, G), a pure
    function of the keys and the seed (murmur3's 32-bit finaliser on a mix of the three)."""
    mask = 0xFFFFFFFF
    h = (rows.long().unsqueeze(1) * 0x9E3779B1 + cols.long().unsqueeze(0) * 0x85EBCA77) & mask
    h = (h ^ ((seed * 0xC2B2AE3D) & mask)) & mask
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> shift)) * mult) & mask  # int64 products wrap; the low 32 bits are exact
    h = h ^ (h >> 16)
    return (h.double() + 0.5) / 2**32


def mine_hard_negatives(
    logits_per_image: Tensor,
    logits_per_text: Tensor,
    labels: Tensor,
    same_image: Tensor,
    same_text: Tensor,
    row_keys: Tensor,
    col_keys: Tensor,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw one hard negative text per image and one hard negative image per text.

    Each row samples from softmax(logits) over the allowed columns by the Gumbel-max trick,
    with noise that is a function of (seed, row key, column key) only: however the global
    batch is dealt to the ranks, one process and several draw the same negatives.

    Args:
        logits_per_image: (B, G) this rank's images against the G texts of the global batch.
        logits_per_text: (B, G) this rank's texts against the G images.
        labels: (B,) each row's own column.
        same_image: (B, G) bool: column j shows the same image as row i (excluded both ways).
        same_text: (B, G) bool: text j equals text i (an exact duplicate caption: excluded).
        row_keys, col_keys: (B,), (G,) stable ids of the pairs (e.g. their dataset rows).
        seed: the same on every rank for this micro-batch.

    Returns:
        (negative text column (B,), negative image column (B,), valid_text (B,) bool,
        valid_image (B,) bool); a row with no allowed column is not valid.
    """
    rows = logits_per_image.shape[0]
    device = logits_per_image.device
    banned = same_image | same_text
    banned[torch.arange(rows, device=device), labels] = True
    out = []
    for salt, logits in enumerate((logits_per_image, logits_per_text)):
        noise = _hash_uniform(2 * seed + salt, row_keys.cpu(), col_keys.cpu()).clamp(
            1e-12, 1 - 1e-12
        )
        gumbel = (-torch.log(-torch.log(noise))).to(device)
        scores = (logits.detach().double() + gumbel).masked_fill(banned, -math.inf)
        out.append((scores.argmax(dim=1), torch.isfinite(scores.max(dim=1).values)))
    (neg_text, valid_text), (neg_image, valid_image) = out
    return neg_text, neg_image, valid_text, valid_image


# Calibration ------------------------------------------------------------------------------


@dataclass
class MatcherPairs:
    """Scored (image, text) pairs of a held-out set.

    logits (P,) raw matcher logits; labels (P,) 1 for true pairs; query (P,) the query each pair
    was made for; is_best_wrong (P,) the dual encoder's top wrong candidate of its query.
    """

    logits: Tensor
    labels: Tensor
    query: Tensor
    is_best_wrong: Tensor


@dataclass
class HeldOut:
    """A held-out set through the dual encoder: unique image paths, captions, each caption's
    image (owner), the decoded images (N_img, 3, S, S), padded text ids / masks, and the
    cosine similarities (N_img, N_txt) on the CPU."""

    images: list[str]
    texts: list[str]
    owner: Tensor
    pixels: Tensor
    ids: Tensor
    mask: Tensor
    sims: Tensor


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_held_out(
    model: Beit3WithMatcher,
    tokenizer: TextTokenizer,
    preprocess: PreprocessConfig,
    records: Sequence[PairRecord],
    batch_size: int,
) -> HeldOut:
    """Decode and embed ``records`` (one process); every image must be readable."""
    images, texts, owner = group_by_image(records)
    device = next(model.parameters()).device
    files = ImageFiles(images, preprocess)
    tensors = []
    for position in range(len(files)):
        _, tensor, reason = files[position]
        if tensor is None:
            raise InputDataError(f"{images[position]}: {reason}")
        tensors.append(tensor)
    pixels = torch.stack(tensors)
    image_embeds = torch.cat(
        [
            model.encode_image(pixels[i : i + batch_size].to(device))
            for i in range(0, len(pixels), batch_size)
        ]
    )
    batch = tokenizer(list(texts))
    ids, mask = batch.text_ids, batch.padding_mask
    text_embeds = torch.cat(
        [
            model.encode_text(
                ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device)
            )
            for i in range(0, len(ids), batch_size)
        ]
    )
    sims = (image_embeds @ text_embeds.T).cpu()
    return HeldOut(images, texts, torch.tensor(owner, dtype=torch.long), pixels, ids, mask, sims)


@torch.no_grad()
def _score_pairs(
    model: Beit3WithMatcher,
    pixels: Tensor,
    ids: Tensor,
    mask: Tensor,
    pairs: Tensor,
    batch_size: int,
) -> Tensor:
    """Raw matcher logits of (image index, text index) pairs (P, 2) -> (P,)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, pairs.shape[0], batch_size):
        chunk = pairs[i : i + batch_size]
        out.append(
            model.match_logits(
                pixels[chunk[:, 0]].to(device),
                ids[chunk[:, 1]].to(device),
                mask[chunk[:, 1]].to(device),
            ).cpu()
        )
    return torch.cat(out) if out else torch.zeros(0)


def _wrong_mask(texts: Sequence[str], owner: Tensor, num_images: int) -> Tensor:
    """(N_img, N_txt) bool: text j is a true caption of image i, or equals one of them."""
    true = torch.zeros(num_images, len(texts), dtype=torch.bool)
    true[owner, torch.arange(len(texts))] = True
    by_text: dict[str, list[int]] = {}
    for j, text in enumerate(texts):
        by_text.setdefault(text, []).append(j)
    for same in by_text.values():
        if len(same) > 1:
            images = owner[same].unique()
            true[images.unsqueeze(1), torch.tensor(same).unsqueeze(0)] = True
    return true


@torch.no_grad()
def matcher_pairs(
    model: Beit3WithMatcher,
    tokenizer: TextTokenizer,
    preprocess: PreprocessConfig,
    records: Sequence[PairRecord],
    *,
    negatives: int = 3,
    batch_size: int = 64,
) -> MatcherPairs:
    """Every true pair of ``records`` and, per image and per caption, its ``negatives`` hardest
    wrong candidates by the dual encoder, scored by the matcher (one process)."""
    with _eval_mode(model):
        enc = encode_held_out(model, tokenizer, preprocess, records, batch_size)
        images, texts, owner, sims = enc.images, enc.texts, enc.owner, enc.sims
        pixels, ids, mask = enc.pixels, enc.ids, enc.mask
        true = _wrong_mask(texts, owner, len(images))
        pairs, labels, query, best_wrong = [], [], [], []
        for t in range(len(texts)):  # true pairs: query = the caption
            pairs.append((int(owner[t]), t))
            labels.append(1)
            query.append(len(images) + t)
            best_wrong.append(False)
        wrong = sims.masked_fill(true, -math.inf)
        k = min(negatives, max(len(texts) - 1, 0))
        for i in range(len(images)):  # image -> wrong captions
            for rank, t in enumerate(wrong[i].topk(k).indices.tolist() if k else []):
                if math.isfinite(float(wrong[i, t])):
                    pairs.append((i, t))
                    labels.append(0)
                    query.append(i)
                    best_wrong.append(rank == 0)
        k = min(negatives, max(len(images) - 1, 0))
        for t in range(len(texts)):  # caption -> wrong images
            for rank, i in enumerate(wrong[:, t].topk(k).indices.tolist() if k else []):
                if math.isfinite(float(wrong[i, t])):
                    pairs.append((i, t))
                    labels.append(0)
                    query.append(len(images) + t)
                    best_wrong.append(rank == 0)
        logits = _score_pairs(
            model, pixels, ids, mask, torch.tensor(pairs, dtype=torch.long), batch_size
        )
    return MatcherPairs(
        logits,
        torch.tensor(labels, dtype=torch.float32),
        torch.tensor(query, dtype=torch.long),
        torch.tensor(best_wrong, dtype=torch.bool),
    )


def fit_platt(logits: Tensor, labels: Tensor, steps: int = 200) -> tuple[float, float]:
    """Platt scaling: (scale, bias) minimising the cross-entropy of sigmoid(scale * x + bias)
    against ``labels`` (float64 LBFGS on two numbers)."""
    if labels.numel() == 0 or labels.min() == labels.max():
        raise InputDataError("calibration needs both matching and non-matching pairs")
    x, y = logits.double(), labels.double()
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(params[0] * x + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, bias = params.detach().tolist()
    return float(scale), float(bias)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 10) -> float:
    """ECE: the |accuracy - confidence| gap of equal-width probability bins, weighted by size
    (confidence = the predicted probability of a match, accuracy = the fraction that match)."""
    probs, labels = probs.double().flatten(), labels.double().flatten()
    index = (probs * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += float(inside.sum()) * abs(float(probs[inside].mean() - labels[inside].mean()))
    return total / max(probs.numel(), 1)


def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half."""
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    scores = torch.cat([positive, negative]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks of ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = positive.numel(), negative.numel()
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability_diagram(probs: Tensor, labels: Tensor, path: str | Path, bins: int = 10) -> Path:
    """Write a reliability diagram (PNG): per probability bin, the fraction of true matches
    (bars) against the diagonal of perfect calibration, with the bin counts."""
    from PIL import Image, ImageDraw

    size, pad = 480, 48
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    plot = size - 2 * pad

    def xy(px: float, py: float) -> tuple[float, float]:
        return pad + px * plot, size - pad - py * plot

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    probs, labels = probs.double().flatten(), labels.double().flatten()
    index = (probs * bins).long().clamp(max=bins - 1)
    for b in range(bins):
        inside = index == b
        if not inside.any():
            continue
        accuracy = float(labels[inside].mean())
        draw.rectangle(
            [xy(b / bins, accuracy), xy((b + 1) / bins, 0)], fill=(90, 140, 220), outline="white"
        )
        draw.text(
            xy(b / bins + 0.01, min(accuracy, 0.93) + 0.05), str(int(inside.sum())), fill="black"
        )
    draw.line([xy(0, 0), xy(1, 1)], fill=(200, 40, 40), width=2)
    ece = expected_calibration_error(probs, labels, bins)
    draw.text((pad, 12), f"reliability: {probs.numel()} pairs, ECE {ece:.3f}", fill="black")
    draw.text((pad, size - pad + 14), "predicted match probability (0 .. 1)", fill="black")
    draw.text((6, pad - 16), "fraction that match", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# Reranked recall ----------------------------------------------------------------------------


def _recall_from_ranks(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    return {k: float((ranks < k).double().mean()) for k in ks}


@torch.no_grad()
def reranked_recall(
    model: Beit3WithMatcher,
    tokenizer: TextTokenizer,
    preprocess: PreprocessConfig,
    records: Sequence[PairRecord],
    *,
    rerank: int,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
) -> dict[str, float]:
    """Recall@k both ways with the dual encoder alone and with its top-``rerank`` candidates
    re-ordered by the calibrated match probability (one process).

    Rank = the number of candidates ordered before the best true one (a candidate with an
    equal score is ordered after it).
    """
    with _eval_mode(model):
        enc = encode_held_out(model, tokenizer, preprocess, records, batch_size)
        texts, owner, sims = enc.texts, enc.owner, enc.sims
        pixels, ids, mask = enc.pixels, enc.ids, enc.mask
        true = torch.zeros_like(sims, dtype=torch.bool)
        true[owner, torch.arange(len(texts))] = True
        metrics: dict[str, float] = {}
        for direction, scores, truth in (("i2t", sims, true), ("t2i", sims.T, true.T)):
            dual_ranks, rerank_ranks = [], []
            k = min(rerank, scores.shape[1])
            top = scores.topk(k, dim=1).indices  # (Q, K) candidates of each query
            queries = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(top)
            # (image, text) rows: the query is the image for i2t, the text for t2i.
            pairs = torch.stack([queries, top] if direction == "i2t" else [top, queries], -1)
            logits = _score_pairs(
                model, pixels, ids, mask, pairs.reshape(-1, 2), batch_size
            ).reshape(top.shape)
            match = model.calibrated(logits)
            for q in range(scores.shape[0]):
                row, hits = scores[q], truth[q]
                best_true = row[hits].max()
                dual_ranks.append(int((row > best_true).sum()))
                # Reranked order: the top K by match probability, then the rest by cosine.
                order = top[q][match[q].argsort(descending=True, stable=True)]
                position = (hits[order]).nonzero()
                if position.numel():
                    rerank_ranks.append(int(position[0]))
                else:
                    rerank_ranks.append(int((row > best_true).sum()))  # beyond K: unchanged
            for name, ranks in (("", dual_ranks), ("rerank_", rerank_ranks)):
                for kk, value in _recall_from_ranks(torch.tensor(ranks), ks).items():
                    metrics[f"{name}{direction}_r{kk}"] = value
    return metrics


def matcher_calibration(
    model: Beit3WithMatcher,
    tokenizer: TextTokenizer,
    preprocess: PreprocessConfig,
    records: Sequence[PairRecord],
    *,
    negatives: int = 3,
    batch_size: int = 64,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """How well ``match`` is calibrated on held-out pairs against their hard negatives.

    Returns:
        ({"ece", "auroc", "num_pairs_calibration"}, probabilities (P,), labels (P,)); ECE over
        10 bins of every scored pair; AUROC of the true pairs against each query's best-scoring
        wrong candidate (by the dual encoder).
    """
    pairs = matcher_pairs(
        model, tokenizer, preprocess, records, negatives=negatives, batch_size=batch_size
    )
    probs = model.calibrated(pairs.logits)
    metrics = {
        "ece": expected_calibration_error(probs, pairs.labels),
        "auroc": auroc(probs[pairs.labels == 1], probs[pairs.is_best_wrong]),
        "num_pairs_calibration": float(probs.numel()),
    }
    return metrics, probs, pairs.labels
