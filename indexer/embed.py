"""Batched embedding: DataLoader workers decode and preprocess, the model runs in inference mode.

On CUDA the model runs under bf16 autocast (the embeddings come back as float32, L2-normalised);
on CPU it stays in fp32 (bf16 is ~100x slower on CPUs without AMX, see environment.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beit3 import PreprocessConfig, TextTokenizer
from beit3.datasets import ImageFiles
from beit3.heads import Beit3ForRetrieval
from beit3.run import autocast, resolve_device
from beit3.transforms import load_image_tensor

__all__ = [
    "EmbeddedBatch",
    "embed_image_files",
    "embed_texts",
    "encode_images",
    "load_query_image",
    "resolve_device",
]

logger = logging.getLogger(__name__)


def load_query_image(
    source: str | Path | bytes | BinaryIO | Image.Image, preprocess: PreprocessConfig
) -> torch.Tensor:
    """One image (path, bytes, file object or PIL image) -> (3, S, S), decoded as the indexer and
    the evaluator decode (:func:`beit3.transforms.load_image_tensor`).

    Raises:
        InputDataError: the image cannot be used (one-line reason).
    """
    return load_image_tensor(source, preprocess)


def _has_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per-process; threads would only oversubscribe


class EmbeddedBatch(NamedTuple):
    """positions (into the input list) with vectors (N, D) float32, and failed positions."""

    positions: list[int]
    vectors: np.ndarray
    failures: list[tuple[int, str]]


@torch.inference_mode()
def encode_images(
    model: Beit3ForRetrieval, images: torch.Tensor, device: torch.device
) -> np.ndarray:
    """(B, 3, S, S) -> (B, D) float32 unit vectors."""
    with autocast(device):  # bf16 on CUDA (beit3.run's policy: precision auto)
        vectors = model.encode_image(images.to(device, non_blocking=True))
    return vectors.float().cpu().numpy()


def embed_image_files(
    model: Beit3ForRetrieval,
    preprocess: PreprocessConfig,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device,
) -> Iterator[EmbeddedBatch]:
    """Embed image files in input order, batch by batch; unreadable files come back as failures.

    Decoding and preprocessing run in ``num_workers`` DataLoader processes (0: in this process).
    """
    loader = DataLoader(
        ImageFiles(paths, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=ImageFiles.collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 and _has_fork() else None,
    )
    dim = model.embed_dim
    with warnings.catch_warnings():
        # LanceDB warns on any fork once its runtime exists. The workers only decode images
        # (Pillow, numpy, torch CPU ops) and never touch LanceDB, so fork is safe here; spawn
        # and forkserver would re-import the caller's __main__ (breaking `python -c`, stdin and
        # notebook callers) and pickle the whole path list into every worker.
        warnings.filterwarnings("ignore", message=".*fork support is experimental.*")
        batches = iter(loader)
    for batch in batches:
        if batch.images is None:
            yield EmbeddedBatch([], np.zeros((0, dim), np.float32), batch.failures)
            continue
        yield EmbeddedBatch(
            batch.positions, encode_images(model, batch.images, device), batch.failures
        )


@torch.inference_mode()
def embed_texts(
    model: Beit3ForRetrieval,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: torch.device,
) -> Iterator[np.ndarray]:
    """Embed texts in order, ``batch_size`` at a time -> (B, D) float32 unit vectors per batch.

    Texts longer than the tokenizer's ``max_len`` are truncated (the official behaviour).
    """
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]))
        with autocast(device):  # bf16 on CUDA (beit3.run's policy: precision auto)
            vectors = model.encode_text(batch.text_ids.to(device), batch.padding_mask.to(device))
        yield vectors.float().cpu().numpy()
