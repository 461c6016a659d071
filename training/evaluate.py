"""Image->text and text->image recall@k of a retrieval model on held-out pairs.

Each image is encoded once (the official loop encodes it once per caption), texts once each; with
several processes each rank encodes a contiguous share and the features are gathered *before*
scoring (the official ``--dist_eval`` scores each rank's shard alone, spec 6.4 caveat a). Scores
are computed in blocks (see :mod:`training.metrics`). Unreadable images are reported, and dropped
with their captions.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from beit3.checkpoint import load_checkpoint
from beit3.data import PairRecord, group_by_image, read_pairs
from beit3.datasets import ImageFiles
from beit3.errors import ConfigError, InputDataError
from beit3.run import DistInfo, autocast, gather_rows, init_distributed, resolve_bf16, shard_range
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig
from training.config import EvalConfig
from training.metrics import RECALL_KS, retrieval_recall

__all__ = ["embed_pairs", "evaluate", "evaluate_model", "format_table"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


def evaluate(config: EvalConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Recall@k of ``config.checkpoint`` on ``config.data``; runs under torchrun too.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "average"}`` as fractions, plus
        ``num_images``, ``num_texts``, ``skipped_images``, ``model_id`` and ``data``. Also written
        to ``output_dir/metrics.json`` (by rank 0) when output_dir is set.

    Raises:
        CheckpointError, InputDataError: a bad checkpoint or data source (named).
    """
    info = init_distributed(config.device)
    use_bf16 = resolve_bf16(config.precision, info.device)
    ckpt = load_checkpoint(config.checkpoint, device=info.device)
    if config.rerank and info.world_size > 1:
        raise ConfigError("eval --rerank runs on one process; start it without torchrun")
    matcher = ckpt.matcher if config.rerank else None  # "no matcher: fine-tune with --itm"
    records = read_pairs(config.data, config.image_column, config.text_column)
    metrics = evaluate_model(
        ckpt.retrieval_model,
        ckpt.tokenizer,
        ckpt.preprocess,
        records,
        dist_info=info,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        use_bf16=use_bf16,
        block_size=config.block_size,
        ks=config.ks,
        progress=progress,
    )
    result: dict[str, Any] = {**metrics, "model_id": ckpt.model_id, "data": str(config.data)}
    if matcher is not None:
        from training.matching import matcher_calibration, reliability_diagram, reranked_recall

        scores = reranked_recall(
            matcher,
            ckpt.tokenizer,
            ckpt.preprocess,
            records,
            rerank=config.rerank,
            ks=config.ks,
            batch_size=config.batch_size,
        )
        calibration, probs, labels = matcher_calibration(
            matcher, ckpt.tokenizer, ckpt.preprocess, records, batch_size=config.batch_size
        )
        result.update(calibration)
        result.update({k: v for k, v in scores.items() if k.startswith("rerank_")})
        result["rerank"] = config.rerank
        result["rerank_average"] = sum(
            v for k, v in scores.items() if k.startswith("rerank_")
        ) / max(sum(k.startswith("rerank_") for k in scores), 1)
        if config.output_dir is not None:
            diagram = reliability_diagram(
                probs, labels, Path(config.output_dir) / "reliability.png"
            )
            result["reliability_diagram"] = str(diagram)
    if config.output_dir is not None and info.is_main:
        path = Path(config.output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        logger.info("wrote %s", path)
    return result


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    tokenizer: TextTokenizer,
    preprocess: PreprocessConfig,
    records: Sequence[PairRecord],
    *,
    dist_info: DistInfo | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    use_bf16: bool = False,
    block_size: int = 512,
    ks: Sequence[int] = RECALL_KS,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Recall@k of an in-memory model (with ``encode_image`` / ``encode_text``) on pairs.

    Every rank must call this (it gathers); under FSDP pass the sharded model, whose encode
    methods are collective: every rank runs the same number of encoder calls.

    Returns:
        Recalls and ``average`` (fractions), ``num_images``, ``num_texts``, ``skipped_images``.
    """
    start = time.monotonic()
    images, texts, owner = group_by_image(records)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    is_main = rank == 0
    device = dist_info.device if dist_info else next(model.parameters()).device
    img_lo, img_hi = shard_range(len(images), rank, world)
    txt_lo, txt_hi = shard_range(len(texts), rank, world)
    # Same number of encoder calls on every rank (FSDP forwards are collective).
    image_calls = math.ceil(math.ceil(len(images) / world) / batch_size)
    text_calls = math.ceil(math.ceil(len(texts) / world) / batch_size)
    total = image_calls + text_calls
    was_training = model.training
    model.eval()
    try:
        with autocast(device, enabled=use_bf16):
            image_embeds, broken = _encode_images(
                model,
                images,
                (img_lo, img_hi),
                preprocess,
                batch_size,
                num_workers,
                device,
                image_calls,
                (lambda done: progress(done, total)) if progress and is_main else None,
            )
            text_embeds = _encode_texts(
                model,
                tokenizer,
                texts[txt_lo:txt_hi],
                batch_size,
                device,
                text_calls,
                (lambda done: progress(image_calls + done, total))
                if progress and is_main
                else None,
            )
    finally:
        model.train(was_training)
    image_embeds = gather_rows(image_embeds)  # (N_img, D), in image order
    broken = gather_rows(broken).bool()  # (N_img,)
    text_embeds = gather_rows(text_embeds)  # (N_txt, D)
    owner_t = torch.as_tensor(owner, dtype=torch.long, device=device)
    if broken.any():
        # Drop unreadable images and their captions; renumber the remaining images.
        keep_text = ~broken[owner_t]
        new_index = torch.cumsum((~broken).long(), 0) - 1
        image_embeds, text_embeds = image_embeds[~broken], text_embeds[keep_text]
        owner_t = new_index[owner_t[keep_text]]
    if image_embeds.shape[0] == 0 or text_embeds.shape[0] == 0:
        raise InputDataError("no readable image with a caption to evaluate on")
    metrics = retrieval_recall(image_embeds, text_embeds, owner_t, ks, block_size)
    metrics.update(
        num_images=int(image_embeds.shape[0]),
        num_texts=int(text_embeds.shape[0]),
        skipped_images=int(broken.sum()),
    )
    if is_main:
        logger.info(
            "evaluated %d images and %d captions in %.1f s (%d unreadable images skipped)",
            metrics["num_images"],
            metrics["num_texts"],
            time.monotonic() - start,
            metrics["skipped_images"],
        )
    return metrics


@torch.no_grad()
def embed_pairs(
    model: nn.Module,
    tokenizer: TextTokenizer,
    preprocess: PreprocessConfig,
    records: Sequence[PairRecord],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """Each pair's image and text embedding, (N, D) each, on the CPU, from one process (every
    image decoded and encoded once, as for recall); an unreadable image's rows are zero."""
    images, texts, owner = group_by_image(records)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        image_embeds, _ = _encode_images(
            model,
            images,
            (0, len(images)),
            preprocess,
            batch_size,
            num_workers,
            device,
            math.ceil(len(images) / batch_size),
            None,
        )
        text_embeds = _encode_texts(
            model, tokenizer, texts, batch_size, device, math.ceil(len(texts) / batch_size), None
        )
    finally:
        model.train(was_training)
    owner_t = torch.as_tensor(owner, dtype=torch.long, device=image_embeds.device)
    return image_embeds[owner_t].float().cpu(), text_embeds.float().cpu()


def _encode_images(
    model: nn.Module,
    paths: Sequence[str],
    span: tuple[int, int],
    preprocess: PreprocessConfig,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    calls: int,
    progress: Callable[[int], None] | None,
) -> tuple[Tensor, Tensor]:
    """This rank's images -> ((n, D) float32 embeddings, (n,) broken flags); broken rows are 0.

    Decoded as the indexer decodes (:class:`beit3.datasets.ImageFiles`), so recall is measured on the
    vectors an index of these images holds.
    """
    lo, hi = span
    dataset = Subset(ImageFiles(paths, preprocess), range(lo, hi))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=ImageFiles.collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )  # never draw from the global RNG
    out: Tensor | None = None
    broken = torch.zeros(hi - lo, dtype=torch.long, device=device)
    done = 0
    empty = torch.zeros(0, 3, preprocess.img_size, preprocess.img_size, device=device)
    for batch in loader:
        images = batch.images
        embeds = model.encode_image(
            images.to(device, non_blocking=True) if images is not None else empty
        )
        if out is None:
            out = torch.zeros(hi - lo, embeds.shape[1], device=device)
        index = torch.tensor(batch.positions, dtype=torch.long) - lo
        out[index.to(device)] = embeds.float()
        for position, reason in batch.failures:
            logger.warning("skipped %s: %s", paths[position], reason)
            broken[position - lo] = 1
        done += 1
        if progress:
            progress(done)
    while done < calls:  # this rank's share is shorter: keep collective forwards in step
        embeds = model.encode_image(empty)
        done += 1
    if out is None:
        out = torch.zeros(0, _embed_dim(model), device=device)
    return out, broken


def _encode_texts(
    model: nn.Module,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    batch_size: int,
    device: torch.device,
    calls: int,
    progress: Callable[[int], None] | None,
) -> Tensor:
    chunks = []
    for call in range(calls):
        part = texts[call * batch_size : (call + 1) * batch_size]
        batch = tokenizer(list(part)) if part else tokenizer([""])
        ids, mask = batch.text_ids.to(device), batch.padding_mask.to(device)
        if not part:
            ids, mask = ids[:0], mask[:0]
        chunks.append(model.encode_text(ids, mask).float())
        if progress:
            progress(call + 1)
    if not chunks:
        return torch.zeros(0, _embed_dim(model), device=device)
    return torch.cat(chunks)


def _embed_dim(model: nn.Module) -> int:
    return int(getattr(model, "embed_dim", None) or model.config.embed_dim)  # type: ignore[union-attr]


def format_table(metrics: dict[str, Any]) -> str:
    """A small table of the recalls in percent, as papers print them."""
    ks = sorted(int(k[5:]) for k in metrics if k.startswith("i2t_r"))
    header = "             " + "".join(f"{'R@' + str(k):>8}" for k in ks)
    rows = [header]
    directions = [("i2t", "image->text"), ("t2i", "text->image")]
    if "rerank" in metrics:
        n = metrics["rerank"]
        directions += [("rerank_i2t", f"  reranked@{n}"), ("rerank_t2i", f"  reranked@{n}")]
        directions = [directions[0], directions[2], directions[1], directions[3]]
    for prefix, label in directions:
        rows.append(f"{label:13s}" + "".join(f"{100 * metrics[f'{prefix}_r{k}']:8.2f}" for k in ks))
    line = f"average {100 * metrics['average']:.2f}"
    if "rerank" in metrics:
        line += (
            f" (reranked {100 * metrics['rerank_average']:.2f}); match: ECE "
            f"{metrics['ece']:.3f}, AUROC {metrics['auroc']:.3f}"
        )
    if "num_images" in metrics:
        line += (
            f"  ({metrics['num_images']} images, {metrics['num_texts']} captions"
            f", {metrics.get('skipped_images', 0)} unreadable images skipped)"
        )
    rows.append(line)
    return "\n".join(rows)
