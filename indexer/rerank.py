"""Reranking with the fusion-encoder matcher: the scoring both search paths share.

- :func:`match_probabilities`: calibrated match probabilities of (image, text) pairs, in
  batches of :data:`RERANK_BATCH` (bf16 autocast on CUDA, as the evaluator scores them).
- :func:`candidate_image`: a stored candidate's image, decoded as the indexer decoded it, or None
  (with a warning) when none of its files can be read any more.

:meth:`indexer.Searcher.search` (``rerank=K``) and :class:`indexer.lance_reranker.MatcherReranker`
(LanceDB's reranker interface) both score through these.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from beit3.errors import Beit3Error, InputDataError
from beit3.heads import Beit3WithMatcher
from beit3.run import autocast
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig
from indexer.embed import load_query_image

__all__ = ["RERANK_BATCH", "candidate_image", "match_probabilities"]

logger = logging.getLogger(__name__)

RERANK_BATCH = 32  # (query, candidate) pairs per fusion-encoder forward


def match_probabilities(
    matcher: Beit3WithMatcher,
    tokenizer: TextTokenizer,
    images: Sequence[torch.Tensor],
    texts: Sequence[str],
    device: str | torch.device = "cpu",
) -> list[float]:
    """Calibrated probabilities that each (image (3, S, S), text) pair matches."""
    if len(images) != len(texts):
        raise InputDataError(f"{len(images)} images but {len(texts)} texts to match")
    probs: list[float] = []
    with torch.inference_mode(), autocast(torch.device(device)):
        for lo in range(0, len(texts), RERANK_BATCH):
            batch = tokenizer(list(texts[lo : lo + RERANK_BATCH]))
            probs += (
                matcher.match_probability(
                    torch.stack(list(images[lo : lo + RERANK_BATCH])).to(device),
                    batch.text_ids.to(device),
                    batch.padding_mask.to(device),
                )
                .float()
                .cpu()
                .tolist()
            )
    return probs


def candidate_image(
    paths: Sequence[str | None], preprocess: PreprocessConfig, label: str
) -> torch.Tensor | None:
    """The first of ``paths`` that still decodes, as the indexer decoded it; None, with a
    warning naming ``label`` and the reason, when none does."""
    reason = "no file path"
    for path in paths:
        if not path:
            continue
        try:
            return load_query_image(Path(path), preprocess)
        except Beit3Error as exc:
            reason = str(exc)
    logger.warning("rerank: skipped %s: %s", label, reason)
    return None
