"""Training and evaluation inputs on top of ``beit3.data``.

- :class:`TrainData`: an endless, resumable stream of :class:`beit3.datasets.PairBatch` from a
  manifest, a caption folder or WebDataset shards, sharded across ranks. Its position is
  (epoch, batches consumed this epoch); augmentation is seeded per (seed, epoch, sample), so a
  resumed run sees exactly the batches the uninterrupted run would have.
- Hard negatives: a JSONL manifest row may carry ``"negatives": [image paths]`` (relative to the
  manifest, like ``image``): images known *not* to match that row's text (e.g. relevance
  feedback, :mod:`indexer.feedback`). Batches then are :class:`NegativeBatch`: the pairs plus the
  negative images and the row that owns each; the contrastive loss adds them as extra columns
  for their own text only (:class:`training.loss.ClipLoss`).
- Neighbour batches (:class:`NeighbourSampler`): instead of a random permutation, each epoch's
  batches are built from groups of pairs that a model finds alike (a pair and its nearest pairs
  of *other* images, :func:`nearest_pairs`), so the contrastive loss meets the confusions a
  random batch of a few hundred out of thousands almost never holds ("thumbs up" against
  "thumbs up: medium skin tone"). No image appears twice in one batch.

The readers themselves (``read_pairs``, ``read_captions``, ``is_shard_source``) are
:mod:`beit3.data`'s; evaluation images are :class:`beit3.datasets.ImageFiles`.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from beit3.data import IMAGE_COLUMNS, TEXT_COLUMNS, expand_shards, is_shard_source, read_pairs
from beit3.datasets import PairBatch, PairDataset, ResumableSampler, WebDatasetPairs, collate_pairs
from beit3.errors import ConfigError, InputDataError
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig, TrainImageTransform, load_image

__all__ = [
    "NEGATIVES_COLUMN",
    "NegativeBatch",
    "NeighbourSampler",
    "TrainData",
    "nearest_pairs",
    "read_hard_negatives",
]

NEGATIVES_COLUMN = "negatives"

logger = logging.getLogger(__name__)


class _SeededPairs(PairDataset):
    """PairDataset whose augmentation for sample i in epoch e depends only on (seed, e, i)."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        self.transform.rng.seed(f"{self.seed}:{self.epoch}:{i}")
        return super().__getitem__(i)


class NegativeBatch(NamedTuple):
    """A :class:`beit3.datasets.PairBatch` (the first five fields, same meaning) plus hard
    negatives: negative_images (N, 3, H, W) float, negative_owner (N,) long = the row of this
    batch whose text each negative image does *not* match."""

    images: Tensor
    text_ids: Tensor
    padding_mask: Tensor
    image_index: Tensor
    index: Tensor  # type: ignore[assignment]  # shadows tuple.index, as PairBatch's does
    negative_images: Tensor
    negative_owner: Tensor


def read_hard_negatives(
    source: str | Path,
    image_column: str | None = None,
    text_column: str | None = None,
) -> dict[tuple[str, str], tuple[str, ...]]:
    """The ``negatives`` of a JSONL manifest, keyed like its pair records: (absolute image
    path, whitespace-normalised text) -> absolute negative image paths (in order, no repeats).
    Other sources have none ({}).

    Raises:
        InputDataError: a ``negatives`` value that is not a list of path strings (file:line).
    """
    path = Path(os.path.abspath(source))
    if is_shard_source(source) or path.suffix.lower() not in (".jsonl", ".json"):
        return {}
    root = str(path.parent)
    found: dict[tuple[str, str], list[str]] = {}
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        records = json.loads(path.read_text(encoding="utf-8-sig"))
        if any(isinstance(r, dict) and NEGATIVES_COLUMN in r for r in records):
            raise InputDataError(
                f"{source}: hard negatives are read from JSON lines (one object per line), not "
                "from a JSON array; write the manifest as .jsonl"
            )
        return {}
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            if NEGATIVES_COLUMN not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # read_pairs reports the row
            if not isinstance(record, dict) or NEGATIVES_COLUMN not in record:
                continue
            value = record[NEGATIVES_COLUMN]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise InputDataError(
                    f"{path}:{number}: {NEGATIVES_COLUMN!r} must be a list of image paths, got "
                    f"{json.dumps(value)[:80]}"
                )
            image = _pick(record, image_column, IMAGE_COLUMNS)
            texts = _pick(record, text_column, TEXT_COLUMNS)
            if not isinstance(image, str) or texts is None:
                continue  # not a pair row: read_pairs reports it
            negatives = [os.path.abspath(os.path.join(root, v.strip())) for v in value]
            for text in [texts] if isinstance(texts, str) else texts:
                if not isinstance(text, str) or not " ".join(text.split()):
                    continue
                key = (os.path.abspath(os.path.join(root, image.strip())), " ".join(text.split()))
                kept = found.setdefault(key, [])
                kept.extend(n for n in negatives if n not in kept and n != key[0])
    return {key: tuple(paths) for key, paths in found.items() if paths}


def _pick(record: dict[str, Any], named: str | None, columns: Sequence[str]) -> Any:
    if named is not None:
        return record.get(named)
    return next((record[c] for c in columns if c in record), None)


class _NegativePairs(_SeededPairs):
    """Pairs whose samples also carry up to ``max_negatives`` transformed hard-negative images
    of their text (an unreadable negative is reported once and left out)."""

    def __init__(
        self, *args: Any, negatives: list[tuple[str, ...]], max_negatives: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.negatives = negatives
        self.max_negatives = max_negatives

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        sample = super().__getitem__(i)
        if sample is None:
            return None
        images = []
        for path in self.negatives[i][: self.max_negatives]:
            try:
                images.append(self.transform(load_image(path)))
            except InputDataError as exc:
                if path not in self._reported:
                    self._reported.add(path)
                    logger.warning("skipped hard negative %s: %s", path, exc)
        sample["negatives"] = images
        return sample


def collate_with_negatives(samples: Sequence[dict[str, Any] | None]) -> NegativeBatch | None:
    """:func:`beit3.datasets.collate_pairs`, plus each kept sample's negatives stacked in order
    with the batch row that owns them."""
    batch = collate_pairs(samples)
    if batch is None:
        return None
    kept = [s for s in samples if s is not None]
    images = [image for s in kept for image in s["negatives"]]
    owner = [row for row, s in enumerate(kept) for _ in s["negatives"]]
    shape = batch.images.shape[1:]
    return NegativeBatch(
        *batch,
        torch.stack(images) if images else torch.zeros(0, *shape),
        torch.tensor(owner, dtype=torch.long),
    )


class _ShardStream(IterableDataset):
    """WebDataset shards in a seeded per-epoch shard order, through a seeded shuffle buffer."""

    def __init__(
        self,
        shards: Sequence[Path],
        transform: TrainImageTransform,
        tokenizer: TextTokenizer,
        rank: int,
        world_size: int,
        seed: int,
        buffer_size: int,
    ) -> None:
        self.shards = list(shards)
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.buffer_size = buffer_size
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info else 0
        order = torch.randperm(
            len(self.shards), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        tag = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        self.transform.rng = random.Random(f"augment:{tag}")
        rng = random.Random(f"shuffle:{tag}")
        stream = WebDatasetPairs(
            [self.shards[i] for i in order.tolist()],
            self.transform,
            self.tokenizer,
            self.rank,
            self.world_size,
        )
        buffer: list[dict[str, Any]] = []
        for sample in stream:
            if sample is None:  # a broken image, already reported by WebDatasetPairs
                continue
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            slot = rng.randrange(len(buffer))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def nearest_pairs(
    image_embeds: Tensor, text_embeds: Tensor, image_ids: Sequence[str], k: int, block: int = 2048
) -> Tensor:
    """Each pair's ``k`` nearest pairs of other images: (N, k) long, nearest first.

    A pair's similarity to another is the mean of their image-image and text-text cosines
    (rows of ``image_embeds`` / ``text_embeds`` are L2-normalised, one per pair). Pairs of the
    same image (its other captions) are left out; with fewer than ``k`` other pairs the row is
    padded with -1. Computed in blocks of ``block`` rows (memory: block x N floats).
    """
    n = image_embeds.shape[0]
    assert text_embeds.shape[0] == n == len(image_ids), "one image and text embedding per pair"
    codes = {name: i for i, name in enumerate(dict.fromkeys(image_ids))}
    image_code = torch.tensor([codes[i] for i in image_ids], dtype=torch.long)
    joint = torch.cat([image_embeds.float(), text_embeds.float()], dim=1) / math.sqrt(2.0)
    k_found = min(k, n - 1)
    out = torch.full((n, k), -1, dtype=torch.long)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        sims = joint[lo:hi] @ joint.T  # (b, N): the mean of the two cosines
        same = image_code[lo:hi].unsqueeze(1) == image_code.unsqueeze(0)
        sims.masked_fill_(same, -math.inf)
        values, index = sims.topk(k_found, dim=1) if k_found > 0 else (sims[:, :0], sims[:, :0])
        out[lo:hi, :k_found] = index.masked_fill(values == -math.inf, -1).long()
    return out


class NeighbourSampler(ResumableSampler):
    """Epochs of neighbourhood batches: a seeded order of anchors, each followed by up to
    ``group - 1`` of its nearest pairs not yet used and not clashing with the batch.

    Every pair appears exactly once per epoch (as an anchor if no earlier anchor took it). No
    image and no caption appears twice in one global batch (``batch_size`` x ``world_size``
    consecutive indices; rank r takes every world-th, as
    :class:`beit3.datasets.ResumableSampler` does): the plain name of several variants ("man
    dancing" for each skin tone) would ask each copy to pick its own image among the others.
    Pairs that clash wait for a later batch, and what still clashes at the end of the epoch is
    swapped into another batch where it fits. The order depends only on (seed, epoch,
    neighbours): a resumed run sees the batches the uninterrupted run would.

    Args:
        neighbours: (N, k) long from :func:`nearest_pairs` (-1 = none).
        image_ids: each pair's image (pairs of one image never share a batch).
        texts: each pair's caption (one caption never twice in a batch).
        batch_size: pairs per process per batch.
        group: pairs per neighbourhood (the anchor included), at least 2.
    """

    def __init__(
        self,
        neighbours: Tensor,
        image_ids: Sequence[str],
        texts: Sequence[str],
        *,
        batch_size: int,
        group: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(len(image_ids), rank, world_size, seed=seed)
        if neighbours.shape[0] != len(image_ids):
            raise InputDataError(
                f"neighbour lists for {neighbours.shape[0]} pairs, but the data has "
                f"{len(image_ids)}: they were computed for other data (delete them to recompute)"
            )
        if group < 2:
            raise ConfigError(f"a neighbourhood needs at least 2 pairs, got group={group}")
        self.neighbours = neighbours.tolist()
        # A pair's keys, exclusive within a batch: its image and its caption.
        images = {name: i for i, name in enumerate(dict.fromkeys(image_ids))}
        captions = {text: -1 - i for i, text in enumerate(dict.fromkeys(texts))}
        self.keys = [(images[i], captions[t]) for i, t in zip(image_ids, texts, strict=True)]
        self.global_batch = batch_size * world_size
        self.group = group

    def order(self, epoch: int) -> list[int]:
        """This epoch's global order (all ranks), before sharding."""
        queue = collections.deque(
            torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed + epoch)
            ).tolist()
        )
        waiting: collections.deque[int] = collections.deque()  # clashed with an earlier batch
        used = bytearray(self.size)
        order: list[int] = []
        in_batch: set[int] = set()  # the image and caption keys of the batch being built
        while queue or waiting:
            if len(order) % self.global_batch == 0:  # a new batch: the waiting pairs first
                in_batch = set()
                queue.extendleft(reversed(waiting))
                waiting.clear()
            forced = not queue  # what is left all clashes with this batch: no way round
            anchor = waiting.popleft() if forced else queue.popleft()
            if used[anchor]:
                continue
            if not forced and not in_batch.isdisjoint(self.keys[anchor]):
                waiting.append(anchor)
                continue
            taken = [anchor]
            in_batch.update(self.keys[anchor])
            room = self.global_batch - len(order) % self.global_batch
            for other in self.neighbours[anchor]:
                if len(taken) >= min(self.group, room):
                    break
                if other < 0 or used[other] or not in_batch.isdisjoint(self.keys[other]):
                    continue
                taken.append(other)
                in_batch.update(self.keys[other])
            for i in taken:
                used[i] = 1
            order.extend(taken)
        self._separate_clashes(order)
        return order

    def _separate_clashes(self, order: list[int]) -> None:
        """Swap each pair that shares a key with its batch (left at the end of an epoch) with a
        pair of another batch where neither clashes; in place."""
        size = self.global_batch
        batches = [order[lo : lo + size] for lo in range(0, len(order), size)]
        keys = [collections.Counter(k for i in b for k in self.keys[i]) for b in batches]

        def fits(i: int, b: int, leaving: int) -> bool:
            out = self.keys[leaving]
            return all(keys[b][k] - (k in out) == 0 for k in self.keys[i])

        for b, batch in enumerate(batches):
            for slot, i in enumerate(batch):
                if all(keys[b][k] == 1 for k in self.keys[i]):
                    continue
                for c, other_batch in enumerate(batches):
                    if c == b:
                        continue
                    swap = next(
                        (s for s, j in enumerate(other_batch) if fits(i, c, j) and fits(j, b, i)),
                        None,
                    )
                    if swap is None:
                        continue
                    j = other_batch[swap]
                    keys[b].subtract(self.keys[i])
                    keys[c].subtract(self.keys[j])
                    keys[b].update(self.keys[j])
                    keys[c].update(self.keys[i])
                    batch[slot], other_batch[swap] = j, i
                    break
        order[:] = [i for b in batches for i in b]

    def indices(self, epoch: int) -> list[int]:
        order = self.order(epoch)
        total = self.num_samples * self.world_size
        order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank : total : self.world_size]


class TrainData:
    """Endless training batches for this rank, resumable at a batch boundary.

    Args:
        source: a .jsonl/.json/.csv/.tsv manifest, a folder of images with .txt captions, or
            WebDataset shards (a .tar, a folder of .tar files, or ``shard-{000..099}.tar``); read
            by :mod:`beit3.data` (bad rows are skipped and logged with file:line and reason).
        tokenizer: the text tokenizer.
        preprocess: image size and normalisation.
        batch_size: pairs per batch on this rank.
        rank, world_size: this process's share.
        seed: data order and augmentation seed.
        num_workers: DataLoader worker processes.
        crop_scale: random-resized-crop area range (official 0.5-1).
        hflip: horizontal flip probability.
        shuffle_buffer: samples held for shuffling a shard stream.
        max_negatives: hard negatives used per text (the first ones of its ``negatives``);
            0 ignores them. When the manifest has any, batches are :class:`NegativeBatch`.

    Raises:
        InputDataError: unreadable source, or fewer pairs per rank than one batch.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        tokenizer: TextTokenizer,
        preprocess: PreprocessConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        image_column: str | None = None,
        text_column: str | None = None,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.5,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
        max_negatives: int = 8,
    ) -> None:
        self.source = str(source)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.batch = 0  # batches consumed in the current epoch
        transform = TrainImageTransform(preprocess, scale=crop_scale, hflip=hflip)
        self.is_stream = is_shard_source(source)
        self.num_negatives = 0  # hard-negative images listed (before the per-text cap)
        collate: Any = collate_pairs
        if self.is_stream:
            shards = expand_shards(source)
            if len(shards) < world_size:
                raise InputDataError(
                    f"{source}: {len(shards)} shards for {world_size} processes; every process "
                    "needs at least one shard (split the data into more shards)"
                )
            usable = max(1, len(shards) // world_size)
            if num_workers > usable:
                logger.warning(
                    "%s: %d shards per process, so %d data workers instead of %d",
                    source,
                    usable,
                    usable,
                    num_workers,
                )
                num_workers = usable
            self.dataset: Dataset | IterableDataset = _ShardStream(
                shards, transform, tokenizer, rank, world_size, seed, shuffle_buffer
            )
            self.sampler = None
            self.records: list | None = None
            self.num_pairs: int | None = None
            self.batches_per_epoch: int | None = None
        else:
            records = read_pairs(source, image_column, text_column)
            hard = read_hard_negatives(source, image_column, text_column) if max_negatives else {}
            if hard:
                negatives = [hard.get((r.image, r.text), ()) for r in records]
                self.num_negatives = sum(len(n) for n in negatives)
                self.dataset = _NegativePairs(
                    records,
                    transform,
                    tokenizer,
                    seed=seed,
                    negatives=negatives,
                    max_negatives=max_negatives,
                )
                collate = collate_with_negatives
                logger.info(
                    "%s: %d hard-negative images for %d of %d texts (at most %d each)",
                    source,
                    self.num_negatives,
                    sum(bool(n) for n in negatives),
                    len(records),
                    max_negatives,
                )
            else:
                self.dataset = _SeededPairs(records, transform, tokenizer, seed=seed)
            self.sampler = ResumableSampler(len(records), rank, world_size, seed=seed)
            self.records = records
            self.num_pairs = len(records)
            self.batches_per_epoch = self.sampler.num_samples // batch_size
            if self.batches_per_epoch == 0:
                raise InputDataError(
                    f"{source}: {len(records)} pairs give each of {world_size} processes "
                    f"{self.sampler.num_samples}, fewer than one batch of {batch_size}; "
                    "lower --batch-size"
                )
        self.generator = torch.Generator()
        self._loader_options = {
            "batch_size": batch_size,
            "drop_last": True,
            "num_workers": num_workers,
            "collate_fn": collate,
            "pin_memory": pin_memory,
            # An own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run's drop-path masks would drift from the uninterrupted run's.
            "generator": self.generator,
        }
        self.loader = DataLoader(self.dataset, sampler=self.sampler, **self._loader_options)

    def use_neighbours(self, neighbours: Tensor, group: int) -> None:
        """Build every epoch's batches from neighbourhoods of ``group`` pairs
        (:class:`NeighbourSampler`; ``neighbours`` from :func:`nearest_pairs` on this data's
        pairs, in manifest order)."""
        if self.records is None or self.sampler is None:
            raise ConfigError(
                f"{self.source}: neighbour batches need a manifest or caption folder "
                "(a shard stream has no random access)"
            )
        self.sampler = NeighbourSampler(
            neighbours,
            [r.image_id for r in self.records],
            [r.text for r in self.records],
            batch_size=self.batch_size,
            group=group,
            rank=self.sampler.rank,
            world_size=self.sampler.world_size,
            seed=self.seed,
        )
        self.loader = DataLoader(self.dataset, sampler=self.sampler, **self._loader_options)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Continue at ``batch`` (batches already consumed) of ``epoch``."""
        self.epoch, self.batch = epoch, batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> Iterator[PairBatch | None]:
        """Yield batches forever (None when every image of a batch was broken); the position
        counts a batch as consumed when it is yielded."""
        while True:
            self.generator.manual_seed(self.seed + self.epoch)
            self.dataset.epoch = self.epoch  # type: ignore[union-attr]
            if self.sampler is not None:
                self.sampler.set_position(self.epoch, self.batch * self.batch_size)
                batches: Iterator[PairBatch | None] = iter(self.loader)
            else:
                # A stream cannot seek: replay this epoch's first batches and drop them.
                batches = itertools.islice(iter(self.loader), self.batch, None)
            produced = False
            for batch in batches:
                produced = True
                self.batch += 1
                yield batch
            if not produced and self.batch == 0:
                raise InputDataError(
                    f"{self.source}: an epoch gave this process no full batch of "
                    f"{self.batch_size} pairs; lower --batch-size or add data"
                )
            self.epoch, self.batch = self.epoch + 1, 0
