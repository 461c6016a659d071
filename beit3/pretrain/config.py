"""Run configurations for pretraining and for training the visual tokenizer.

Both are frozen dataclasses that *name* a preset (and optional overrides) rather than holding a
model config; unknown keys in ``from_dict`` are rejected with the closest valid spelling. The
resolved config is written to ``output_dir/run_config.json`` by the training functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from beit3.config import ConfigMixin
from beit3.errors import ConfigError
from beit3.run.wrap import STRATEGIES

__all__ = ["PretrainConfig", "VisualTokenizerConfig"]

Precision = Literal["auto", "bf16", "fp32"]


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(ConfigMixin):
    """Masked data modeling pretraining (BEiT-3 Sec. 2.3, spec section 5).

    Data: ``pair_data`` are image-text sources (JSONL/CSV manifests, folders of images with .txt
    captions, WebDataset shards); ``text_data`` plain text files (one text per line, or a
    JSONL/CSV text column) for the text-only stream, default: the pair captions; ``image_data``
    image folders or manifests for the image-only stream, default: the pair images. A kind of
    batch is switched off by a batch size of 0.

    Batch sizes are per process; the paper's step is 2048 texts + 2048 images + 2048 pairs in
    total. Optimisation defaults are the paper's (Table 11): AdamW (0.9, 0.98), eps 1e-6, peak lr
    1e-3 after 10k warmup steps, cosine decay, weight decay 0.05, drop path 0.1, clip 3.0.
    """

    output_dir: str
    # Model
    preset: str = "beit3-base"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str | None = None
    visual_tokenizer: str | None = None
    # Data
    pair_data: tuple[str, ...] = ()
    text_data: tuple[str, ...] = ()
    image_data: tuple[str, ...] = ()
    image_column: str | None = None
    text_column: str | None = None
    text_batch_size: int = 64
    image_batch_size: int = 64
    pair_batch_size: int = 64
    text_max_len: int = 128
    pair_max_len: int = 64
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: float = 0.5
    num_workers: int = 4
    # Masking
    text_mask_ratio: float = 0.15
    pair_text_mask_ratio: float = 0.5
    image_mask_ratio: float = 0.4
    pair_image_mask_ratio: float = 0.4
    min_mask_block: int = 16
    bert_masking: bool = False
    # Loss
    text_weight: float = 1.0
    image_weight: float = 1.0
    pair_weight: float = 1.0
    # Optimisation
    max_steps: int = 1_000_000
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 10_000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 3.0
    drop_path_rate: float = 0.1
    # Runtime
    device: str = "auto"
    precision: Precision = "auto"
    use_checkpoint: bool = False
    strategy: str = "auto"
    compile: bool = False
    fused_optimizer: bool | None = None
    static_shapes: bool | None = None
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: str | None = None
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("pair_data", "text_data", "image_data", "crop_scale", "betas"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        for name in (
            "text_mask_ratio",
            "pair_text_mask_ratio",
            "image_mask_ratio",
            "pair_image_mask_ratio",
            "hflip",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        for name in (
            "text_batch_size",
            "image_batch_size",
            "pair_batch_size",
            "num_workers",
            "warmup_steps",
            "keep_checkpoints",
            "seed",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "log_every", "save_every", "min_mask_block"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("text_max_len", "pair_max_len"):
            if getattr(self, name) < 3:
                raise ConfigError(
                    f"{name} must be >= 3 (<s>, a token, </s>), got {getattr(self, name)}"
                )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= min_lr <= lr and lr > 0, got lr {self.lr}, min_lr {self.min_lr}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy {self.strategy!r} unknown; use one of {', '.join(STRATEGIES)}"
            )
        if self.text_batch_size + self.image_batch_size + self.pair_batch_size == 0:
            raise ConfigError("every batch size is 0: nothing to train on")
        if not (self.pair_data or self.text_data or self.image_data):
            raise ConfigError(
                "no training data: give pair_data (--pairs), text_data (--texts) "
                "or image_data (--images)"
            )
        if self.resume is not None and self.resume != "latest" and not self.resume:
            raise ConfigError("resume must be 'latest' or a step directory")


@dataclass(frozen=True, kw_only=True)
class VisualTokenizerConfig(ConfigMixin):
    """Training of a VQ-KD visual tokenizer (BEiT v2 recipe, spec section 5).

    ``data``: image folders, or pair sources whose images are used. ``teacher``: ``"pixels"``
    (the preprocessed pixels of each patch: trains from nothing), ``"pixels-patchnorm"`` (each
    patch standardised), or a BEiT-3 checkpoint directory (its frozen vision encoder). Defaults
    follow BEiT v2: AdamW (0.9, 0.99), weight decay 1e-4, lr 2e-4 for a batch of 512
    (5e-5 x 512 / 128), random resized crops down to 8% of the image. Every ``reseed_every``
    steps, codes that received fewer than ``dead_code_threshold`` vectors since the last check
    (all ranks together) are re-seeded from the current batch (0 = never). Every ``save_every``
    steps the run also writes ``output_dir/checkpoints/step-N`` (weights, optimizer, data
    position, codebook statistics, RNG; the newest ``keep_checkpoints`` are kept), from which
    ``resume="latest"`` (or a step directory) continues the same run.
    """

    output_dir: str
    data: tuple[str, ...]
    preset: str = "vqkd-base"
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher: str = "pixels"
    image_column: str | None = None
    text_column: str | None = None
    batch_size: int = 64
    max_steps: int = 50_000
    lr: float = 2e-4
    min_lr: float = 1e-5
    warmup_steps: int = 1000
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    kmeans_iters: int = 10
    reseed_every: int = 200
    dead_code_threshold: float = 1.0
    device: str = "auto"
    precision: Precision = "auto"
    num_workers: int = 4
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: str | None = None
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "crop_scale", "betas"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        object.__setattr__(self, "overrides", dict(self.overrides))
        if not self.data:
            raise ConfigError("the visual tokenizer needs training images (--data)")
        for name in ("batch_size", "max_steps", "log_every", "save_every", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got {self.lr}, {self.min_lr}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.resume is not None and self.resume != "latest" and not self.resume:
            raise ConfigError("resume must be 'latest' or a step directory")
