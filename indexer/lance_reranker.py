"""The fusion-encoder matcher behind LanceDB's reranker interface.

For people who query an index table with LanceDB's own query builder::

    import lancedb
    from indexer.lance_reranker import MatcherReranker

    table = lancedb.connect(DB / "lance").open_table(NAME)
    reranker = MatcherReranker("runs/itm/final")
    hits = table.search(vector).limit(32).rerank(reranker, query_string=text).to_arrow()

Each row gets ``_relevance_score``, the calibrated match probability of (the query text, the
row's image), and the rows come back in that order. LanceDB hands a reranker the query as a
string, so this is the text -> image direction (an image table); :meth:`indexer.Searcher.search`
with ``rerank=K`` covers image -> text as well, through the same scoring
(:mod:`indexer.rerank`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from lancedb.rerankers import Reranker

from beit3 import Checkpoint, load_checkpoint
from beit3.errors import InputDataError
from indexer.rerank import candidate_image, match_probabilities

__all__ = ["MatcherReranker"]


class MatcherReranker(Reranker):
    """LanceDB reranker: rows of an image table re-scored by the fusion-encoder matcher.

    Args:
        checkpoint: a checkpoint directory or a loaded :class:`beit3.Checkpoint` with a
            matcher (``beit3 finetune --itm``); without one it raises "no matcher: fine-tune
            it with --itm".
        device: where the matcher runs.
        return_score: ``"relevance"`` (only ``_relevance_score``) or ``"all"`` (also keep the
            search's ``_distance`` / ``_score``), as LanceDB's own rerankers.

    A row whose image files are all gone is dropped with a warning, never a crash.
    """

    def __init__(
        self,
        checkpoint: str | Path | Checkpoint,
        device: str | torch.device = "cpu",
        return_score: str = "relevance",
    ) -> None:
        super().__init__(return_score)
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.checkpoint = ckpt
        self.matcher = ckpt.matcher.to(device)
        self.device = device

    def rerank_vector(self, query: str, vector_results: pa.Table) -> pa.Table:
        return self._score(query, vector_results)

    def rerank_fts(self, query: str, fts_results: pa.Table) -> pa.Table:
        return self._score(query, fts_results)

    def rerank_hybrid(
        self, query: str, vector_results: pa.Table, fts_results: pa.Table
    ) -> pa.Table:
        merged = (
            self._merge_and_keep_scores(vector_results, fts_results)
            if self.score == "all"
            else self.merge_results(vector_results, fts_results)
        )
        return self._score(query, merged)

    def _score(self, query: str, results: pa.Table) -> pa.Table:
        if not isinstance(query, str) or not query.strip():
            raise InputDataError("MatcherReranker needs the query text (query_string=...)")
        modalities = (
            set(results.column("modality").to_pylist())
            if "modality" in results.column_names
            else set()
        )
        if "path" not in results.column_names or modalities - {"image"}:
            raise InputDataError(
                "MatcherReranker scores a text query against an image table; these results "
                f"are not image rows (modality: {sorted(map(str, modalities)) or 'none'})"
            )
        rows = results.to_pylist()
        keep, images = [], []
        for position, row in enumerate(rows):
            paths = [row.get("path"), *(row.get("paths") or [])]
            label = row.get("path") or row.get("sha256") or f"row {position}"
            image = candidate_image(paths, self.checkpoint.preprocess, label)
            if image is not None:
                keep.append(position)
                images.append(image)
        probs = match_probabilities(
            self.matcher,
            self.checkpoint.tokenizer,
            images,
            [query.strip()] * len(images),
            self.device,
        )
        kept = results.take(pa.array(keep, type=pa.int64()))
        kept = kept.append_column("_relevance_score", pa.array(probs, type=pa.float32()))
        order = sorted(range(len(probs)), key=lambda i: -probs[i])  # stable: ties keep order
        kept = kept.take(pa.array(order, type=pa.int64()))
        return self._keep_relevance_score(kept)
