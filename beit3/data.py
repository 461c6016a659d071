"""Readers for image-text pairs and plain texts, shared by pretraining and fine-tuning.

Sources of pairs:
- a JSONL or CSV manifest: one row per image with an image path (relative to the manifest) and a
  caption or a list of captions; extra columns are ignored;
- an image folder where ``cat.jpg`` has its captions in ``cat.txt`` (one per line);
- WebDataset tar shards (``shard-000.tar``, a folder of them, or ``shards-{000..009}.tar``): files
  sharing a key (``0001.jpg`` + ``0001.txt``/``0001.json``) form a sample; streamed, never unpacked.
A row per (image, caption), as the official code iterates over captions. Broken images are
reported once with their path and skipped by the collate function.
"""

from __future__ import annotations

import array
import csv
import json
import logging
import math
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from beit3.errors import InputDataError
from beit3.tokenizer import PAD_ID, TextTokenizer
from beit3.transforms import load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "PairBatch",
    "PairDataset",
    "PairRecord",
    "ResumableSampler",
    "TextLineDataset",
    "WebDatasetPairs",
    "collate_pairs",
    "expand_shards",
    "group_by_image",
    "read_pairs",
    "read_texts",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_IMAGE_KEYS = ("image", "image_path", "path", "file", "filename", "filepath", "img")
_TEXT_KEYS = ("text", "caption", "captions", "texts", "name", "title")


@dataclass(frozen=True)
class PairRecord:
    """One (image, caption) pair. ``image_id`` groups the captions of one image."""

    image: str
    text: str
    image_id: str


def read_pairs(
    source: str | Path,
    image_column: str | None = None,
    text_column: str | None = None,
) -> list[PairRecord]:
    """Read pairs from a manifest (.jsonl / .csv) or an image folder with .txt captions.

    Raises:
        InputDataError: the source does not exist, a row is malformed (file and line named), or
            no usable pair is found.
    """
    path = Path(source)
    if path.is_dir():
        records = _read_folder(path)
    elif not path.is_file():
        raise InputDataError(f"{path}: no such file or folder")
    elif path.suffix.lower() in (".jsonl", ".json"):
        records = _read_jsonl(path, image_column, text_column)
    elif path.suffix.lower() in (".csv", ".tsv"):
        records = _read_csv(path, image_column, text_column)
    else:
        raise InputDataError(
            f"{path}: unknown manifest type {path.suffix!r}; use .jsonl, .csv, a folder of images "
            "with .txt captions, or WebDataset .tar shards"
        )
    if not records:
        raise InputDataError(
            f"{path}: no usable image-text pairs (every row lacked an image or text)"
        )
    return records


def _pick(
    keys: Sequence[str], wanted: str | None, candidates: tuple[str, ...], where: str, what: str
) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise InputDataError(f"{where}: no column {wanted!r} (columns: {', '.join(keys)})")
        return wanted
    for key in candidates:
        if key in keys:
            return key
    raise InputDataError(
        f"{where}: no {what} column; expected one of {', '.join(candidates)} "
        f"(found {', '.join(keys) or 'nothing'}); name it with --{what}-column"
    )


def _captions(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [" ".join(v.split()) for v in value if isinstance(v, str) and v.strip()]


def _read_jsonl(path: Path, image_column: str | None, text_column: str | None) -> list[PairRecord]:
    records: list[PairRecord] = []
    root = path.parent
    image_key = text_key = None
    empty = 0
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise InputDataError(
                f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputDataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputDataError(
                f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
            )
        if image_key is None:
            where = f"{path}:{number}"
            image_key = _pick(list(row), image_column, _IMAGE_KEYS, where, "image")
            text_key = _pick(list(row), text_column, _TEXT_KEYS, where, "text")
        image, texts = row.get(image_key), _captions(row.get(text_key))
        if not isinstance(image, str) or not image or not texts:
            empty += 1
            continue
        image_path = str((root / image).resolve())
        records.extend(PairRecord(image_path, t, image_path) for t in texts)
    if empty:
        logger.warning("%s: skipped %d rows without an image path or a caption", path, empty)
    return records


def _read_csv(path: Path, image_column: str | None, text_column: str | None) -> list[PairRecord]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    except csv.Error as exc:
        raise InputDataError(f"{path}: malformed CSV ({exc})") from None
    if not rows:
        raise InputDataError(f"{path}: empty CSV (a header row and data rows are needed)")
    keys = list(rows[0])
    image_key = _pick(keys, image_column, _IMAGE_KEYS, str(path), "image")
    text_key = _pick(keys, text_column, _TEXT_KEYS, str(path), "text")
    records = []
    for row in rows:
        image, text = row.get(image_key) or "", " ".join((row.get(text_key) or "").split())
        if image and text:
            image_path = str((path.parent / image).resolve())
            records.append(PairRecord(image_path, text, image_path))
    return records


def _read_folder(path: Path) -> list[PairRecord]:
    records: list[PairRecord] = []
    uncaptioned = 0
    for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            uncaptioned += 1
            continue
        try:
            lines = caption_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            logger.warning("%s: not valid UTF-8, skipped", caption_file)
            continue
        texts = _captions(lines)
        if not texts:
            uncaptioned += 1
        image_path = str(image.resolve())
        records.extend(PairRecord(image_path, t, image_path) for t in texts)
    if uncaptioned:
        logger.warning(
            "%s: %d images have no (non-empty) .txt caption and were skipped", path, uncaptioned
        )
    return records


def group_by_image(records: Sequence[PairRecord]) -> tuple[list[str], list[str], list[int]]:
    """Split pairs for evaluation: unique images, all texts, and each text's image index."""
    index: dict[str, int] = {}
    images: list[str] = []
    texts: list[str] = []
    owner: list[int] = []
    for r in records:
        if r.image_id not in index:
            index[r.image_id] = len(images)
            images.append(r.image)
        texts.append(r.text)
        owner.append(index[r.image_id])
    return images, texts, owner


def read_texts(source: str | Path, column: str | None = None) -> Iterator[str]:
    """Yield non-empty texts from a .txt file (one per line) or a .jsonl/.csv column."""
    path = Path(source)
    if not path.is_file():
        raise InputDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        if suffix == ".jsonl":
            key = None
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputDataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
                if key is None:
                    key = _pick(list(row), column, _TEXT_KEYS, f"{path}:{number}", "text")
                yield from _captions(row.get(key))
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            key = _pick(reader.fieldnames or [], column, _TEXT_KEYS, str(path), "text")
            for row in reader:
                yield from _captions(row.get(key))
        else:
            for line in f:
                if line.strip():
                    yield " ".join(line.split())


# Datasets ----------------------------------------------------------------------------------


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
                logger.warning("skipped: %s", exc)
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


def expand_shards(source: str | Path) -> list[Path]:
    """A .tar file, a folder of .tar files, or a brace pattern ``name-{000..009}.tar``."""
    text = str(source)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", text)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        paths = [
            Path(text[: match.start()] + str(i).zfill(width) + text[match.end() :])
            for i in range(int(lo), int(hi) + 1)
        ]
    elif Path(text).is_dir():
        paths = sorted(Path(text).glob("*.tar"))
    else:
        paths = [Path(text)]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise InputDataError(
            f"{source}: shard {missing[0] if missing else '(none)'} does not exist"
        )
    return paths


def _iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members of a WebDataset shard by key (name up to the first dot)."""
    current: str | None = None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                directory = member.name[: -len(name)]
                key, _, ext = name.partition(".")
                key = directory + key
                if current is not None and key != current:
                    yield current, files
                    files = {}
                current = key
                data = tar.extractfile(member)
                files[ext.lower()] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError) as exc:
        logger.warning("%s: unreadable shard, rest of it skipped (%s)", path, exc)
    if current is not None:
        yield current, files


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
            for key, files in _iter_tar_samples(shard):
                image_ext = next((e for e in files if "." + e in IMAGE_EXTENSIONS), None)
                texts = (
                    _captions(files["txt"].decode("utf-8", "replace").splitlines())
                    if "txt" in files
                    else []
                )
                if not texts and "json" in files:
                    try:
                        meta = json.loads(files["json"])
                        texts = _captions(next((meta[k] for k in _TEXT_KEYS if k in meta), None))
                    except (json.JSONDecodeError, TypeError):
                        texts = []
                if image_ext is None or not texts:
                    logger.warning("%s: sample %s has no image or no caption, skipped", shard, key)
                    continue
                try:
                    image = self.transform(load_image(files[image_ext]))
                except InputDataError as exc:
                    logger.warning("%s: sample %s skipped: %s", shard, key, exc)
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
