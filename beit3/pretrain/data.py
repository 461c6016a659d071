"""The three data streams of pretraining: texts, images, and image-text pairs, already masked.

Each stream is an endless, resumable iterator of :class:`MaskedBatch`. Readers come from
:mod:`beit3.data`; masking happens in the loader's collate function (worker processes, CPU),
seeded per *sample* from (run seed, kind, epoch, index): a sample gets the same crop and the same
mask whatever the batch, the number of processes, or a resume in between. The masked positions
are listed as fixed-size index tensors (:func:`beit3.pretrain.masking.compact_positions`), so the training
step never has to ask the device how many tokens were masked.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from beit3.data import (
    PairRecord,
    expand_shards,
    is_shard_source,
    list_images,
    read_pairs,
    read_texts,
)
from beit3.datasets import PairDataset, ResumableSampler, TextLineDataset, WebDatasetPairs
from beit3.errors import ConfigError, InputDataError
from beit3.pretrain.masking import IGNORE_INDEX, BlockMasking, compact_positions, mask_text_row
from beit3.tokenizer import PAD_ID, TextTokenizer
from beit3.transforms import PreprocessConfig, TrainImageTransform, load_image

__all__ = [
    # list_images is beit3.data's, re-exported for the visual tokenizer's trainer.
    "KINDS",
    "BatchMasker",
    "BatchStream",
    "ImageDataset",
    "KeyedDataset",
    "MaskedBatch",
    "build_streams",
    "list_images",
    "max_masked",
]

logger = logging.getLogger(__name__)

KINDS = ("text", "image", "pair")
_KIND_ID = {"text": 1, "image": 2, "pair": 3}


class MaskedBatch(NamedTuple):
    """One masked batch of one kind (absent parts are None).

    images (B, 3, H, W) float; text_ids (B, L) long with masked tokens replaced; padding_mask
    (B, L) bool (True = pad); image_mask (B, N) bool (True = masked patch); text_positions
    (B, Kt) long and text_targets (B, Kt) long (``IGNORE_INDEX`` in unused slots); image_positions
    (B, Ki) long (every image has the same number of masked patches); index (B,) long sample ids.
    """

    images: Tensor | None
    text_ids: Tensor | None
    padding_mask: Tensor | None
    image_mask: Tensor | None
    text_positions: Tensor | None
    text_targets: Tensor | None
    image_positions: Tensor | None
    index: Tensor  # type: ignore[assignment]  # shadows tuple.index, on purpose

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskedBatch:
        return MaskedBatch(
            *(t.to(device, non_blocking=non_blocking) if t is not None else None for t in self)  # type: ignore[arg-type]
        )

    def pin_memory(self) -> MaskedBatch:
        return MaskedBatch(*(t.pin_memory() if t is not None else None for t in self))  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        return int(self.index.shape[0])


@dataclass
class BatchMasker:
    """Collate function: pads, masks and lists the masked positions of one kind of batch.

    Args:
        kind: ``text``, ``image`` or ``pair``.
        seed: the run seed.
        mask_id: the text tokenizer's mask id.
        text_ratio: fraction of each text's tokens to mask (0 = no text part).
        image_masking: block masking of the patch grid (None = no image part).
        bert: BERT's 80/10/10 instead of always the mask id.
        random_range: [low, high) ids for BERT's random replacement.
        pad_to: pad texts to this length (static shapes for torch.compile); default the longest.
        text_slots: fixed number of text position slots (static shapes); default the largest count.
    """

    kind: str
    seed: int
    mask_id: int
    text_ratio: float = 0.0
    image_masking: BlockMasking | None = None
    bert: bool = False
    random_range: tuple[int, int] | None = None
    pad_to: int | None = None
    text_slots: int | None = None

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> MaskedBatch | None:
        kept = [s for s in samples if s is not None]
        if not kept:
            return None
        kind_id = _KIND_ID[self.kind]
        rngs = [np.random.default_rng([self.seed, kind_id, *s["key"]]) for s in kept]
        index = torch.tensor([s["key"][-1] for s in kept], dtype=torch.long)
        images = image_mask = image_positions = None
        text_ids = padding_mask = text_positions = text_targets = None
        if self.kind != "text":
            images = torch.stack([s["image"] for s in kept])
            if self.image_masking is not None and self.image_masking.num_masked > 0:
                masks = np.stack([self.image_masking(rng).reshape(-1) for rng in rngs])
                image_mask = torch.from_numpy(masks)
                image_positions, _ = compact_positions(image_mask)
        if self.kind != "image":
            text_ids, padding_mask, text_positions, text_targets = self._mask_texts(
                [s["text_ids"] for s in kept], rngs
            )
        return MaskedBatch(
            images,
            text_ids,
            padding_mask,
            image_mask,
            text_positions,
            text_targets,
            image_positions,
            index,
        )

    def _mask_texts(
        self, texts: list[list[int]], rngs: list[np.random.Generator]
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        length = max(len(t) for t in texts)
        if self.pad_to is not None:
            length = max(length, self.pad_to)
        ids = np.full((len(texts), length), PAD_ID, dtype=np.int64)
        for row, t in enumerate(texts):
            ids[row, : len(t)] = t
        padding = torch.from_numpy(ids == PAD_ID)
        if self.text_ratio <= 0:
            return torch.from_numpy(ids), padding, None, None
        inputs = np.empty_like(ids)
        chosen = np.zeros(ids.shape, dtype=bool)
        for row, rng in enumerate(rngs):
            inputs[row], chosen[row] = mask_text_row(
                ids[row],
                self.text_ratio,
                self.mask_id,
                rng,
                random_ratio=0.1 if self.bert else 0,
                keep_ratio=0.1 if self.bert else 0,
                random_range=self.random_range,
            )
        positions, valid = compact_positions(torch.from_numpy(chosen))
        if self.text_slots is not None:
            if positions.shape[1] > self.text_slots:
                raise ConfigError(
                    f"{positions.shape[1]} masked tokens exceed the {self.text_slots} static slots"
                )
            extra = self.text_slots - positions.shape[1]
            positions = torch.nn.functional.pad(positions, (0, extra))
            valid = torch.nn.functional.pad(valid, (0, extra))
        original = torch.from_numpy(ids).gather(1, positions)
        targets = torch.where(valid, original, torch.full_like(original, IGNORE_INDEX))
        return torch.from_numpy(inputs), padding, positions, targets


def max_masked(length: int, ratio: float) -> int:
    """The most tokens :func:`mask_text_row` masks in a text of ``length`` ids (<s>/</s> excluded)."""
    return max(1, int(round(ratio * max(length - 2, 1))))


# Datasets ------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images only (the image-only stream): decodes and transforms one image; None if broken."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], Tensor]) -> None:
        self.paths = list(paths)
        if not self.paths:
            raise InputDataError("the image-only stream is empty")
        self.transform = transform
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        try:
            return {"image": self.transform(load_image(self.paths[i])), "index": i}
        except InputDataError as exc:
            if self.paths[i] not in self._reported:
                self._reported.add(self.paths[i])
                logger.warning("skipped %s", exc)  # "<path>: <reason>", as beit3.data words it
            return None


class KeyedDataset(Dataset):
    """Looks samples up by (epoch, index) and seeds the crop per sample."""

    def __init__(
        self, base: Dataset, transform: TrainImageTransform | None, seed: int, kind: str
    ) -> None:
        self.base, self.transform, self.seed, self.kind = base, transform, seed, kind

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = key
        if self.transform is not None:
            self.transform.rng.seed(f"{self.seed}/{self.kind}/{epoch}/{index}")
        sample = self.base[index]
        if sample is None:
            return None
        if isinstance(sample, list):  # TextLineDataset gives bare ids
            sample = {"text_ids": sample}
        sample["key"] = (epoch, index)
        return sample


class _KeyedSampler(Sampler[tuple[int, int]]):
    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _KeyedShards(IterableDataset):
    """WebDataset samples keyed by (epoch, rank, worker, counter); crops seeded per worker."""

    def __init__(
        self,
        base: WebDatasetPairs,
        transform: TrainImageTransform,
        seed: int,
        kind: str,
        epoch: int,
    ) -> None:
        self.base, self.transform, self.seed, self.kind, self.epoch = (
            base,
            transform,
            seed,
            kind,
            epoch,
        )

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        worker = info.id if info else 0
        self.transform.rng.seed(f"{self.seed}/{self.kind}/{self.epoch}/{self.base.rank}/{worker}")
        for counter, sample in enumerate(self.base):
            if sample is not None:
                sample["key"] = (self.epoch, self.base.rank, worker, counter)
            yield sample


# Streams -------------------------------------------------------------------------------------


class BatchStream:
    """Endless batches of one kind, resumable at (epoch, position in this rank's shard).

    Args:
        dataset: a map-style dataset (a :class:`KeyedDataset`) or a :class:`WebDatasetPairs`.
        batch_size: per process.
        collate: the :class:`BatchMasker`.
        rank, world_size, seed: sharding and shuffling.
        num_workers: loader worker processes.
        pin_memory: pin batches (CUDA).
    """

    def __init__(
        self,
        dataset: Dataset | WebDatasetPairs,
        batch_size: int,
        collate: BatchMasker,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        transform: TrainImageTransform | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.seed, self.transform = seed, transform
        self.epoch = 0
        self.position = 0  # samples of this epoch's shard consumed
        self.streaming = isinstance(dataset, WebDatasetPairs)
        self.sampler = None
        if not self.streaming:
            self.sampler = ResumableSampler(len(dataset), rank, world_size, seed)  # type: ignore[arg-type]
            if self.sampler.num_samples < batch_size:
                raise InputDataError(
                    f"the {collate.kind} stream has {len(dataset)} samples "  # type: ignore[arg-type]
                    f"({self.sampler.num_samples} per process), fewer than its batch size "
                    f"{batch_size}; lower {collate.kind}_batch_size or add data"
                )
        self._iter: Iterator[MaskedBatch | None] | None = None
        self._loader: DataLoader | None = None

    def _open(self) -> Iterator[MaskedBatch | None]:
        # Its own generator: a loader draws a base seed per iterator, which must not advance the
        # global RNG (drop path), or a resumed run would diverge from an uninterrupted one.
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "collate_fn": self.collate,
            "drop_last": True,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "generator": torch.Generator().manual_seed(self.seed),
        }
        if self.streaming:
            assert self.transform is not None, "streaming needs the transform to seed"
            source = _KeyedShards(
                self.dataset,  # type: ignore[arg-type]  # streaming: WebDatasetPairs
                self.transform,
                self.seed,
                self.collate.kind,
                self.epoch,
            )
            iterator = iter(DataLoader(source, **common))
            if self.position:
                logger.info(
                    "%s stream: skipping %d samples to resume", self.collate.kind, self.position
                )
            for _ in range(self.position // self.batch_size):
                next(iterator, None)
            return iterator
        assert self.sampler is not None, "map-style streams have a sampler"
        self.sampler.set_position(self.epoch, self.position)
        if self._loader is None:
            # One loader for the whole run: its workers persist across epochs, and the sampler
            # (iterated in this process) is moved to the next epoch / resume point in between.
            self._loader = DataLoader(
                self.dataset,
                sampler=_KeyedSampler(self.sampler),
                persistent_workers=self.num_workers > 0,
                **common,
            )
        return iter(self._loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> MaskedBatch:
        empty_epochs = 0
        while True:
            if self._iter is None:
                if self.sampler is not None and (
                    self.sampler.num_samples - self.position < self.batch_size
                ):
                    self.epoch, self.position = self.epoch + 1, 0
                self._iter = self._open()
            try:
                batch = next(self._iter)
            except StopIteration:
                # Two epoch ends within one call: a whole epoch gave no batch (too few samples,
                # or every sample unreadable, when each batch comes back None).
                empty_epochs += 1
                if empty_epochs > 1:
                    raise InputDataError(
                        f"the {self.collate.kind} stream yields no full "
                        "batch (too few readable samples)"
                    ) from None
                self._iter = None
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += self.batch_size
            if batch is not None:
                return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iter = None


# Building the streams from a config ------------------------------------------------------------


def build_streams(
    config: Any,
    spm: str | Path,
    *,
    img_size: int,
    grid_size: int,
    use_images: bool,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> dict[str, BatchStream]:
    """The active streams of a :class:`~beit3.pretrain.config.PretrainConfig`, by kind.

    A kind is active when its batch size is > 0 and it has data (texts default to the pair
    captions, images to the pair images); image and pair streams also need ``use_images``.
    """
    pair_tok = TextTokenizer(spm, max_len=config.pair_max_len)
    text_tok = TextTokenizer(spm, max_len=config.text_max_len)
    preprocess = PreprocessConfig(img_size=img_size, max_text_len=config.pair_max_len)
    static = bool(config.static_shapes)
    random_range = (4, pair_tok.num_pieces + 1)

    def transform() -> TrainImageTransform:
        return TrainImageTransform(
            preprocess, scale=config.crop_scale, hflip=config.hflip, rng=random.Random(config.seed)
        )

    def masker(kind: str, text_ratio: float, image_ratio: float, max_len: int) -> BatchMasker:
        masking = (
            BlockMasking(grid_size, image_ratio, min_block=config.min_mask_block)
            if kind != "text"
            else None
        )
        return BatchMasker(
            kind,
            config.seed,
            pair_tok.mask_id,
            text_ratio,
            masking,
            config.bert_masking,
            random_range,
            pad_to=max_len if static else None,
            text_slots=max_masked(max_len, text_ratio) if static and text_ratio else None,
        )

    shards = [s for s in config.pair_data if is_shard_source(s)]
    manifests = [s for s in config.pair_data if not is_shard_source(s)]
    if shards and manifests:
        raise ConfigError(
            "pair_data mixes WebDataset shards and manifests/folders; convert one "
            "kind or run them as separate stages"
        )
    records: list[PairRecord] = []
    for source in manifests:
        records.extend(read_pairs(source, config.image_column, config.text_column))
    shard_paths = [p for s in shards for p in expand_shards(s)]

    streams: dict[str, BatchStream] = {}
    common = {
        "rank": rank,
        "world_size": world_size,
        "seed": config.seed,
        "num_workers": config.num_workers,
        "pin_memory": pin_memory,
    }

    if config.pair_batch_size and use_images and (records or shard_paths):
        t = transform()
        collate = masker(
            "pair", config.pair_text_mask_ratio, config.pair_image_mask_ratio, config.pair_max_len
        )
        data: Dataset
        if shard_paths:
            data = WebDatasetPairs(shard_paths, t, pair_tok, rank, world_size)
            streams["pair"] = BatchStream(
                data, config.pair_batch_size, collate, transform=t, **common
            )
        else:
            data = KeyedDataset(PairDataset(records, t, pair_tok), t, config.seed, "pair")
            streams["pair"] = BatchStream(data, config.pair_batch_size, collate, **common)

    if config.image_batch_size and use_images:
        t = transform()
        collate = masker("image", 0.0, config.image_mask_ratio, config.pair_max_len)
        if config.image_data:
            paths = [p for s in config.image_data for p in list_images(s)]
            data = KeyedDataset(ImageDataset(paths, t), t, config.seed, "image")
            streams["image"] = BatchStream(data, config.image_batch_size, collate, **common)
        elif records:
            paths = list(dict.fromkeys(r.image for r in records))
            data = KeyedDataset(ImageDataset(paths, t), t, config.seed, "image")
            streams["image"] = BatchStream(data, config.image_batch_size, collate, **common)
        elif shard_paths:
            data = WebDatasetPairs(shard_paths, t, pair_tok, rank, world_size)
            streams["image"] = BatchStream(
                data, config.image_batch_size, collate, transform=t, **common
            )

    if config.text_batch_size:
        texts: Iterator[str] = iter(
            itertools.chain.from_iterable(
                read_texts(source, config.text_column) for source in config.text_data
            )
            if config.text_data
            else dict.fromkeys(r.text for r in records)  # the pair captions, each once
        )
        first = next(texts, None)
        if first is not None:
            lines = TextLineDataset(itertools.chain([first], texts), text_tok)
            collate = masker("text", config.text_mask_ratio, 0.0, config.text_max_len)
            data = KeyedDataset(lines, None, config.seed, "text")
            streams["text"] = BatchStream(data, config.text_batch_size, collate, **common)
        elif shard_paths:
            logger.warning(
                "no text-only data: the captions of WebDataset shards are not reused "
                "as a text stream; pass text_data (--texts) for masked LM on texts"
            )
    if not streams:
        raise ConfigError(
            "no active data stream: check the data sources and batch sizes "
            "(images also need a visual tokenizer)"
        )
    return streams
