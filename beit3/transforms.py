"""Image loading and preprocessing, with Pillow and tensors only (no torchvision).

Evaluation follows the official retrieval path exactly: bicubic squash-resize to S x S (no
aspect-preserving crop), then (x / 255 - mean) / std with mean = std = 0.5. Evaluation, indexing
and image queries all decode through :func:`load_image_tensor` (JPEGs drafted to 2 S). Training
adds a random resized crop (area 0.5-1, aspect 3/4-4/3, bicubic) and a horizontal flip.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from beit3.config import ConfigMixin
from beit3.errors import ConfigError, InputDataError

__all__ = [
    "ImageTransform",
    "PreprocessConfig",
    "TrainImageTransform",
    "jpeg_draft_size",
    "load_image",
    "load_image_tensor",
]


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig(ConfigMixin):
    """What a checkpoint expects of its inputs; saved as ``preprocess.json``."""

    img_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    max_text_len: int = 64

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(
                f"interpolation {self.interpolation!r} unknown; use one of {sorted(_RESAMPLE)}"
            )
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# load_image enforces Pillow's pixel limit itself, the same in every thread (a warnings filter
# would be process-wide and race between threads); Pillow's own warning between 1x and 2x the
# limit is therefore noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_image(source: str | Path | bytes | BinaryIO, draft_size: int | None = None) -> Image.Image:
    """Open an image robustly and return it as 8-bit RGB.

    Applies EXIF orientation, takes the first frame of animations, composites transparency onto
    white, maps CMYK / palette / 16-bit / float modes to RGB, and treats anything above Pillow's
    ``MAX_IMAGE_PIXELS`` as a decompression bomb.

    Args:
        source: a path, raw bytes, or a binary file object.
        draft_size: if given, let the JPEG decoder shrink by a power of two while both sides stay
            >= this size (much faster for large photos; not bit-identical to a full decode).

    Raises:
        InputDataError: with a one-line reason when the image cannot be used.
    """
    name = str(source) if isinstance(source, str | Path) else "<bytes>"
    image: Image.Image
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        image = Image.open(source)  # reads the header only; raises above twice the limit
        limit = Image.MAX_IMAGE_PIXELS
        if limit and image.width * image.height > limit:  # checked here, not by a warning filter
            raise Image.DecompressionBombError(
                f"{image.width * image.height} pixels exceed the limit of {limit}"
            )
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.seek(0)
        image.load()
    except Image.DecompressionBombError as exc:
        raise InputDataError(f"{name}: image too large (decompression bomb limit): {exc}") from None
    except FileNotFoundError:
        raise InputDataError(f"{name}: no such file") from None
    except PermissionError:
        raise InputDataError(f"{name}: permission denied") from None
    except IsADirectoryError:
        raise InputDataError(f"{name}: is a directory, not an image") from None
    except Image.UnidentifiedImageError:
        raise InputDataError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputDataError(f"{name}: not a readable image ({reason})") from None
    if image.width < 1 or image.height < 1:
        raise InputDataError(f"{name}: image has zero size")
    with contextlib.suppress(Exception):  # a broken EXIF block is not worth losing the image
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def jpeg_draft_size(config: PreprocessConfig) -> int:
    """The JPEG draft size of :func:`load_image_tensor`: twice the model's input size.

    A draft decodes a JPEG at 1/2, 1/4 or 1/8 scale while both sides stay >= this size (several
    times cheaper for photos); the bicubic resize to ``img_size`` then still starts from at least
    twice the pixels it keeps, so the result stays close to that of a full decode.
    """
    return 2 * config.img_size


def load_image_tensor(
    source: str | Path | bytes | BinaryIO | Image.Image, config: PreprocessConfig
) -> Tensor:
    """Decode and preprocess one image for the model: -> (3, S, S) float32.

    The one decoding path of evaluation, indexing and image queries (JPEGs drafted to
    :func:`jpeg_draft_size`), so an image gets bit-identical inputs, hence vectors, whichever
    of them embeds it. A PIL image is taken as already decoded.

    Raises:
        InputDataError: the image cannot be used (one-line reason, see :func:`load_image`).
    """
    transform = ImageTransform(config)
    if isinstance(source, Image.Image):
        return transform(source)
    return transform(load_image(source, draft_size=jpeg_draft_size(config)))


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.clip((arr - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def _to_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    mean_arr, std_arr = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    arr = (np.asarray(image, dtype=np.float32) / 255.0 - mean_arr) / std_arr  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


class ImageTransform:
    """Evaluation preprocessing: RGB image -> (3, S, S) float32 tensor."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.resample = _RESAMPLE[config.interpolation]

    def __call__(self, image: Image.Image) -> Tensor:
        size = (self.config.img_size, self.config.img_size)
        if image.mode != "RGB":
            image = _to_rgb(image)
        if image.size != size:
            image = image.resize(size, self.resample)
        return _to_tensor(image, self.config.mean, self.config.std)


class TrainImageTransform(ImageTransform):
    """Training augmentation: random resized crop (scale, ratio), horizontal flip, normalise.

    Args:
        config: the checkpoint's preprocessing.
        scale: range of the crop's area as a fraction of the image (official: 0.5-1).
        ratio: range of the crop's aspect ratio.
        hflip: probability of a horizontal flip (0 for data where left/right matters).
        rng: a ``random.Random`` for reproducible crops; the module RNG when omitted.
    """

    def __init__(
        self,
        config: PreprocessConfig,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(config)
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.rng = rng or random.Random()

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """timm/torchvision RandomResizedCrop parameters: (left, top, crop_w, crop_h)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self.rng.randint(0, width - w), self.rng.randint(0, height - h), w, h
        # Fallback: the largest centred crop within the ratio range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: Image.Image) -> Tensor:
        if image.mode != "RGB":
            image = _to_rgb(image)
        left, top, w, h = self.crop_box(*image.size)
        size = (self.config.img_size, self.config.img_size)
        image = image.resize(size, self.resample, box=(left, top, left + w, top + h))
        if self.rng.random() < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self.config.mean, self.config.std)
