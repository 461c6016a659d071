"""Configurations of a fine-tuning run and of an evaluation (frozen, validated dataclasses).

A run *names* its starting point: ``init`` (a checkpoint directory: ours, a converted official
one, or a pretraining checkpoint whose backbone is transferred) or ``preset`` (from scratch, with
``spm`` or a sentencepiece model trained on the training captions). ``None`` fields are resolved
by :func:`training.finetune` and written, resolved, to ``output_dir/run_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from beit3.config import ConfigMixin
from beit3.errors import ConfigError
from beit3.run import PRECISIONS, STRATEGIES

__all__ = ["EvalConfig", "FinetuneConfig"]


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(ConfigMixin):
    """Retrieval fine-tuning (CLIP-style contrastive loss on the dual encoder).

    Defaults follow the official base recipe (spec 6.3) where it applies to any data: AdamW
    (0.9, 0.999), eps 1e-8, weight decay 0.05, layer decay 0.65, drop path 0.2, warmup from 0 for
    a fifth of the steps then cosine to ``min_lr``, no gradient clipping. ``lr`` 1e-4 is the
    Flickr30K base value (global batch 3072); scale it for your batch.

    Attributes:
        train: pairs: a .jsonl/.csv manifest, a folder of images with same-named .txt captions,
            or WebDataset shards (a .tar, a folder of .tar files, or ``shard-{000..099}.tar``).
        output_dir: where checkpoints, ``final/``, ``metrics.jsonl``, TensorBoard logs go.
        task: the fine-tuning task (:mod:`training.tasks`): ``contrastive`` trains the dual
            encoder; ``contrastive-itm`` adds the fusion-encoder matcher (image-text matching on
            hard negatives), calibrated on ``val`` after training.
        task_options: the task's own settings, e.g. ``{"itm_weight": 1.0}``.
        init: checkpoint directory to start from (exclusive with ``preset``).
        preset: preset to train from scratch (e.g. ``beit3-tiny``).
        spm: sentencepiece model for a from-scratch run; when omitted one is trained on the
            training captions (``spm_vocab_size`` pieces at most) and kept in output_dir.
        img_size: image size of a from-scratch model; with ``init``, fine-tune the checkpoint at
            this size (its vision position table resized bicubically).
        max_text_len: longest text in tokens incl. <s> and </s>; default: the checkpoint's, or 64.
        val: held-out pairs evaluated every ``eval_every`` steps and at the end; the best mean
            recall is kept as ``output_dir/best``.
        batch_size: pairs per process per micro-batch (global batch = batch_size x processes;
            the contrastive negatives are the global micro-batch).
        accum_steps: micro-batches per optimizer step (each is its own contrastive batch).
        epochs: length of the run in passes over the data (ignored when max_steps is given).
        max_steps: length in optimizer steps (needed for WebDataset shards).
        warmup_steps: linear warmup from 0; default a fifth of the steps (official 3 of 15 epochs).
        layer_decay: lr scale decay per layer; default 0.65 from a checkpoint, 1.0 from scratch.
        precision: ``auto`` = bf16 autocast on CUDA, fp32 on CPU.
        use_checkpoint: activation checkpointing (less memory, about a third more compute).
        strategy: with several processes (torchrun), ``auto`` = DDP, or FSDP (sharded per
            encoder layer) from 1024 wide (beit3-large) up; ``none`` = one process, no wrapper.
        save_every: optimizer steps between resumable checkpoints (also written at the end).
        keep_checkpoints: how many step checkpoints to keep.
        resume: ``latest`` (newest complete checkpoint of output_dir) or a step directory.
        crop_scale, hflip: training augmentation (random resized crop area, flip probability).
        temperature: start the contrastive temperature (1 / logit scale) here, e.g. 0.02; None
            keeps the start checkpoint's (0.07 from scratch). Adam moves the log scale by about
            ``lr`` a step, so a short run stays near where it starts (issue 16's measurement).
        grad_clip: clip the gradients' global L2 norm to this (0: no clipping); default 0.3
            from scratch, where unclipped gradient spikes (norms 10-30) kept the contrastive
            loss at ln(batch) for a whole 5-minute run (issue 16's measurement), and 0 from a
            checkpoint (the official fine-tuning). The norm before clipping is logged as
            ``grad_norm``.
        shuffle_buffer: samples held to shuffle WebDataset streams.
        max_negatives: hard negatives used per text: a JSONL row's ``negatives`` (images that
            do not match its text, e.g. from relevance feedback) are scored against that text
            only, as extra columns of its contrastive row (:mod:`training.data`); 0 ignores them.
        neighbour_batches: build the batches from neighbourhoods of this many pairs that the
            start model finds alike (a pair and its nearest pairs of other images,
            :class:`training.data.NeighbourSampler`), computed once at the start and kept in
            ``output_dir/neighbours.safetensors``; 0: random batches. Needs a manifest or caption folder.
    """

    train: str
    output_dir: str
    task: str = "contrastive"
    task_options: dict[str, float | str] = field(default_factory=dict)
    init: str | None = None
    preset: str | None = None
    spm: str | None = None
    spm_vocab_size: int = 8000
    img_size: int | None = None
    max_text_len: int | None = None
    val: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    batch_size: int = 64
    accum_steps: int = 1
    epochs: float = 15.0
    max_steps: int | None = None
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    layer_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None
    drop_path_rate: float = 0.2
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: float = 0.5
    temperature: float | None = None
    precision: str = "auto"
    use_checkpoint: bool = False
    strategy: str = "auto"
    device: str = "auto"
    seed: int = 42
    num_workers: int = 4
    shuffle_buffer: int = 1000
    max_negatives: int = 8
    neighbour_batches: int = 0
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int | None = None
    eval_batch_size: int | None = None
    resume: str | None = None
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if (self.init is None) == (self.preset is None):
            raise ConfigError(
                "give exactly one of init (a checkpoint directory to start from) "
                "and preset (to train from scratch)"
            )
        if self.spm is not None and self.init is not None:
            raise ConfigError("spm is for from-scratch runs; a checkpoint brings its own tokenizer")
        for name in ("batch_size", "accum_steps", "log_every", "save_every", "spm_vocab_size"):
            _positive(self, name)
        for name in ("max_steps", "eval_every", "eval_batch_size", "img_size", "max_text_len"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0 (or give max_steps), got {self.epochs}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= min_lr <= lr and lr > 0, got lr {self.lr}, min_lr {self.min_lr}"
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ConfigError(f"betas must be in [0, 1), got {self.betas}")
        if self.temperature is not None and not 0 < self.temperature <= 1:
            raise ConfigError(f"temperature must be in (0, 1], got {self.temperature}")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(
                f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown; use one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} unknown; use one of {STRATEGIES}")
        if not isinstance(self.max_negatives, int) or self.max_negatives < 0:
            raise ConfigError(f"max_negatives must be an integer >= 0, got {self.max_negatives!r}")
        if (
            not isinstance(self.neighbour_batches, int)
            or self.neighbour_batches < 0
            or self.neighbour_batches == 1
        ):
            raise ConfigError(
                "neighbour_batches must be 0 (random batches) or a group size >= 2, got "
                f"{self.neighbour_batches!r}"
            )
        if self.num_workers < 0 or self.keep_checkpoints < 1 or self.shuffle_buffer < 1:
            raise ConfigError("num_workers must be >= 0, keep_checkpoints and shuffle_buffer >= 1")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ConfigMixin):
    """Recall@k of a checkpoint on held-out pairs.

    Attributes:
        checkpoint: checkpoint directory.
        data: a .jsonl/.csv manifest or a folder of images with .txt captions.
        output_dir: where to write ``metrics.json`` (nothing written when None).
        batch_size: images / texts encoded at a time per process.
        block_size: score rows computed at a time (memory: block_size x number of texts).
        ks: recall cut-offs.
        rerank: also measure recall with the top ``rerank`` candidates re-scored by the
            fusion-encoder matcher (a checkpoint trained with --itm), the matcher's ECE and
            AUROC, and write a reliability diagram (one process).
    """

    checkpoint: str
    data: str
    output_dir: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    batch_size: int = 64
    num_workers: int = 2
    block_size: int = 512
    ks: tuple[int, ...] = (1, 5, 10)
    precision: str = "auto"
    device: str = "auto"
    rerank: int = 0

    def __post_init__(self) -> None:
        if self.rerank < 0:
            raise ConfigError(f"rerank must be >= 0, got {self.rerank}")
        for name in ("batch_size", "block_size"):
            _positive(self, name)
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks must be positive cut-offs, got {self.ks}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown; use one of {PRECISIONS}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")


def _positive(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
