"""Torch datasets over what :mod:`beit3.data` reads: image-text pairs (map-style and WebDataset
shards), text lines, and image files to embed. Broken images are reported once with their path
and dropped by the collate functions; an image file that cannot be used comes back with its
reason, never as an error.
"""

from __future__ import annotations

import array
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from beit3.data import (
    PairRecord,
    iter_shard_samples,
    log_skipped,
    read_shard_sample,
)
from beit3.errors import Beit3Error, InputDataError
from beit3.tokenizer import PAD_ID, TextTokenizer
from beit3.transforms import PreprocessConfig, load_image, load_image_tensor

__all__ = [
    "ImageBatch",
    "ImageFiles",
    "PairBatch",
    "PairDataset",
    "ResumableSampler",
    "TextLineDataset",
    "WebDatasetPairs",
    "collate_pairs",
]

logger = logging.getLogger(__name__)


class PairBatch(NamedTuple):
    """images (B, 3, H, W) float; text_ids (B, L) long; padding_mask (B, L) bool (True = pad);
    image_index (B,) long (index of the image in the dataset's image list, for eval/dedup);
    index (B,) long (row index, for resumption and debugging)."""

    images: Tensor
    text_ids: Tensor
    padding_mask: Tensor
    image_index: Tensor
    index: Tensor  # type: ignore[assignment]  # shadows tuple.index, on purpose


class PairDataset(Dataset):
    """Map-style dataset over PairRecords: decodes, transforms and tokenizes one pair.

    Returns None for a broken image (reported once per path per process); ``collate_pairs``
    drops those.
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        transform: Callable[[Any], Tensor],
        tokenizer: TextTokenizer,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.tokenizer = tokenizer
        ids: dict[str, int] = {}
        self.image_index = [ids.setdefault(r.image_id, len(ids)) for r in self.records]
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        record = self.records[i]
        try:
            image = self.transform(load_image(record.image))
        except InputDataError as exc:
            if record.image not in self._reported:
                self._reported.add(record.image)
                log_skipped([(record.image, _reason(str(exc), record.image))])
            return None
        return {
            "image": image,
            "text_ids": self.tokenizer.encode(record.text),
            "image_index": self.image_index[i],
            "index": i,
        }


def collate_pairs(samples: Sequence[dict[str, Any] | None]) -> PairBatch | None:
    """Stack images, right-pad texts with <pad>; drops None samples (broken images)."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    length = max(len(s["text_ids"]) for s in kept)
    ids = torch.full((len(kept), length), PAD_ID, dtype=torch.long)
    for row, s in enumerate(kept):
        ids[row, : len(s["text_ids"])] = torch.as_tensor(s["text_ids"], dtype=torch.long)
    return PairBatch(
        torch.stack([s["image"] for s in kept]),
        ids,
        ids.eq(PAD_ID),
        torch.tensor([s["image_index"] for s in kept], dtype=torch.long),
        torch.tensor([s["index"] for s in kept], dtype=torch.long),
    )


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, sharded across ranks, that can start mid-epoch.

    Every rank gets ``num_samples`` indices (the permutation is padded by wrapping so all ranks
    take the same number of steps). ``set_position(epoch, start)`` resumes at the ``start``-th
    index of this rank's shard of that epoch.
    """

    def __init__(
        self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        if size <= 0:
            raise InputDataError("cannot sample from an empty dataset")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_samples = math.ceil(size / world_size)
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        total = self.num_samples * self.world_size
        order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class WebDatasetPairs(IterableDataset):
    """Stream (image, caption) samples from WebDataset shards, split by rank and worker.

    Args:
        shards: shard paths (see :func:`expand_shards`).
        transform, tokenizer: as for :class:`PairDataset`.
        rank, world_size: this process's share of the shards (shard i goes to rank i % world).
    """

    def __init__(
        self,
        shards: Sequence[Path],
        transform: Callable[[Any], Tensor],
        tokenizer: TextTokenizer,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shards = list(shards)
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        step = self.world_size * workers
        mine = self.shards[self.rank * workers + worker :: step]
        counter = 0
        for shard in mine:
            for key, files in iter_shard_samples(shard):
                sample = read_shard_sample(files)
                if isinstance(sample, str):
                    log_skipped([(f"{shard}:{key}", sample)])
                    continue
                data, texts = sample
                try:
                    image = self.transform(load_image(data))
                except InputDataError as exc:
                    log_skipped([(f"{shard}:{key}", _reason(str(exc), "<bytes>"))])
                    yield None
                    continue
                for text in texts:
                    yield {
                        "image": image,
                        "text_ids": self.tokenizer.encode(text),
                        "image_index": -1,
                        "index": counter,
                    }
                    counter += 1


class TextLineDataset(Dataset):
    """Texts for the text-only stream, tokenized on access.

    The texts are kept as one UTF-8 buffer plus an offset per text (numpy), not a list of str:
    about one byte per character instead of ~50 bytes of object overhead per text, and
    DataLoader workers share the buffer as it is, whereas a list's reference counts make every
    forked worker copy the pages it reads (memory that grows with the epoch).
    """

    def __init__(self, texts: Iterable[str], tokenizer: TextTokenizer) -> None:
        data, offsets = bytearray(), array.array("q", [0])
        for text in texts:
            data += text.encode("utf-8")
            offsets.append(len(data))
        if len(offsets) == 1:
            raise InputDataError("the text-only stream is empty")
        self._data = np.frombuffer(data, dtype=np.uint8)  # views, no copies
        self._offsets = np.frombuffer(offsets, dtype=np.int64)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def text(self, i: int) -> str:
        start, end = self._offsets[i], self._offsets[i + 1]
        return self._data[start:end].tobytes().decode("utf-8")

    def __getitem__(self, i: int) -> list[int]:
        return self.tokenizer.encode(self.text(i))


class ImageBatch(NamedTuple):
    """A batch of :class:`ImageFiles`: the positions of the decoded images (into the path list),
    the images (B', 3, S, S) float32 (None when none decoded), and (position, reason) per
    unusable file."""

    positions: list[int]
    images: Tensor | None
    failures: list[tuple[int, str]]


class ImageFiles(Dataset):
    """Image files to embed: item i -> ``(i, (3, S, S) tensor or None, reason or None)``.

    Decoded by :func:`beit3.transforms.load_image_tensor`, the path that the indexer, the
    evaluator and image queries share. A file that cannot be used is never an error: its reason
    comes back, without the path, for the caller to report.
    """

    def __init__(self, paths: Sequence[str], preprocess: PreprocessConfig) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, Tensor | None, str | None]:
        path = self.paths[position]
        try:
            return position, load_image_tensor(path, self.preprocess), None
        except Beit3Error as exc:
            return position, None, _reason(str(exc), path)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            return position, None, f"{type(exc).__name__}: {first_line}"

    @staticmethod
    def collate(items: Sequence[tuple[int, Tensor | None, str | None]]) -> ImageBatch:
        good = [(i, t) for i, t, _ in items if t is not None]
        failures = [(i, r or "unreadable") for i, t, r in items if t is None]
        images = torch.stack([t for _, t in good]) if good else None
        return ImageBatch([i for i, _ in good], images, failures)


def _reason(message: str, path: str) -> str:
    """An error message without its leading ``<path>: `` (the report names the path)."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
