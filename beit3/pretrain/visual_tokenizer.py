"""Training a VQ-KD visual tokenizer (BEiT v2 recipe), under torchrun or in one process.

The encoder and decoder learn by gradient (cosine reconstruction of the teacher's per-patch
features + commitment); the codebook by k-means on the first batches, then an EMA of the vectors
each code receives. The per-code statistics are summed over ranks before the EMA step, so every
rank keeps the same codebook; k-means and dead-code re-seeding happen on rank 0 and are
broadcast. The tokenizer is written to ``output_dir/tokenizer`` every ``save_every`` steps and
at the end; pass that directory to pretraining as ``visual_tokenizer``. Each save also completes
a step directory (``output_dir/checkpoints/step-N``) from which ``resume`` continues the run
exactly: weights and codebook, optimizer, data position, re-seeding statistics, every RNG.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor

from beit3.errors import ConfigError
from beit3.pretrain.config import VisualTokenizerConfig
from beit3.pretrain.data import BatchStream, ImageDataset, KeyedDataset, list_images
from beit3.pretrain.teachers import Beit3Teacher, PixelTeacher
from beit3.pretrain.vqkd import VQKD, VqkdConfig, get_vqkd_preset, save_vqkd
from beit3.run import (
    LrSchedule,
    RunLogger,
    all_reduce_sum,
    autocast,
    build_adamw,
    choose_strategy,
    clipped_step,
    init_distributed,
    is_distributed,
    load_step_weights,
    resolve_bf16,
    restore_step,
    resume_step_dir,
    run_steps,
    save_step,
    truncate_metrics,
    wrap_model,
    write_run_config,
)
from beit3.transforms import PreprocessConfig, TrainImageTransform

__all__ = ["VisualTokenizerResult", "build_teacher", "train_visual_tokenizer"]

logger = logging.getLogger(__name__)


@dataclass
class VisualTokenizerResult:
    """path: the tokenizer directory; metrics: the last logged metrics (``codebook_usage`` is
    the fraction of codes used at least once in the last log window)."""

    path: Path
    steps: int
    metrics: dict[str, float]


class _ImageCollate:
    kind = "image"

    def __call__(self, samples: list[dict | None]) -> Tensor | None:
        kept = [s["image"] for s in samples if s is not None]
        return torch.stack(kept) if kept else None


def build_teacher(
    name: str, config: VqkdConfig, device: torch.device
) -> PixelTeacher | Beit3Teacher:
    """``pixels``, ``pixels-patchnorm`` or a BEiT-3 checkpoint directory -> a frozen teacher."""
    if name in ("pixels", "pixels-patchnorm"):
        return PixelTeacher(config.patch_size, "none" if name == "pixels" else "patch")
    path = Path(name)
    if not path.is_dir():
        raise ConfigError(
            f"teacher {name!r} is neither 'pixels', 'pixels-patchnorm' nor a checkpoint directory"
        )
    teacher = Beit3Teacher.from_checkpoint(path, device=device)
    tcfg = teacher.backbone.config
    if (tcfg.img_size, tcfg.grid_size) != (config.img_size, config.grid_size):
        raise ConfigError(
            f"teacher {path} sees {tcfg.img_size}-px images in a {tcfg.grid_size}-"
            f"wide grid; the tokenizer has {config.img_size} px, grid "
            f"{config.grid_size}: override img_size/patch_size to match"
        )
    return teacher


def _no_decay(name: str) -> bool:
    # Official VQKD.no_weight_decay: cls tokens and position tables (plus 1-D tensors, biases).
    return name.endswith(("cls_token", "pos_embed"))


def _broadcast_codebook(model: VQKD) -> None:
    if is_distributed():
        for buffer in (
            model.quantize.embedding.weight,
            model.quantize.embedding.initted,
            model.quantize.cluster_size,
        ):
            dist.broadcast(buffer, 0)


def _kmeans_init(
    model: VQKD,
    stream: BatchStream,
    vq_config: VqkdConfig,
    iters: int,
    is_main: bool,
    generator: torch.Generator,
    precision: contextlib.AbstractContextManager,
    device: torch.device,
) -> None:
    """k-means on at least 4 vectors per code (or 20 batches), on rank 0, then broadcast."""
    with torch.no_grad(), precision:
        vectors: list[Tensor] = []
        batches = 0
        while sum(v.shape[0] for v in vectors) < 4 * vq_config.codebook_size and batches < 20:
            batch = cast(Tensor, next(stream))  # _ImageCollate batches are image tensors
            z = model.encode_vectors(batch.to(device, non_blocking=device.type == "cuda"))
            vectors.append(z.reshape(-1, vq_config.codebook_dim).float())
            batches += 1
    if is_main:
        model.quantize.kmeans_init_(torch.cat(vectors).cpu(), iters, generator)
    _broadcast_codebook(model)
    logger.info(
        "codebook of %d x %d initialised by k-means on %d vectors",
        vq_config.codebook_size,
        vq_config.codebook_dim,
        sum(v.shape[0] for v in vectors),
    )


def train_visual_tokenizer(
    config: VisualTokenizerConfig, progress: Callable[[int, int], None] | None = None
) -> VisualTokenizerResult:
    """Train a VQ-KD tokenizer; see the module docstring.

    Args:
        config: the run.
        progress: called as ``progress(step, max_steps)`` after every step.
    """
    info = init_distributed(config.device)
    device = info.device
    cuda = device.type == "cuda"
    use_bf16 = resolve_bf16(config.precision, device)
    output_dir = Path(config.output_dir)
    vq_config = get_vqkd_preset(config.preset, **config.overrides)
    teacher = build_teacher(config.teacher, vq_config, device).to(device)
    teacher_dim = teacher.out_dim(vq_config.in_chans)
    if teacher_dim != vq_config.teacher_dim:
        if "teacher_dim" in config.overrides:
            raise ConfigError(
                f"teacher {config.teacher} gives {teacher_dim} features per patch "
                f"but teacher_dim is overridden to {vq_config.teacher_dim}"
            )
        logger.info(
            "teacher %s gives %d features per patch: decoder output set to %d",
            config.teacher,
            teacher_dim,
            teacher_dim,
        )
        vq_config = vq_config.replace(teacher_dim=teacher_dim)
    if info.is_main:
        write_run_config(output_dir, config)

    torch.manual_seed(config.seed)
    model = VQKD(vq_config)
    step_dir = resume_step_dir(config.resume, output_dir)
    if step_dir is not None:
        load_step_weights(step_dir, model)  # weights and codebook
    model.to(device)
    # The codebook is kept equal on every rank by hand (summed statistics, broadcasts).
    strategy = choose_strategy("auto", info, vq_config.embed_dim, shardable=False)
    forward = wrap_model(model, strategy, info)
    optimizer = build_adamw(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=config.betas,
        eps=1e-8,
        device=device,
        strategy=strategy,
        no_decay=_no_decay,
    )
    start_step, extra = 0, {}
    if step_dir is not None:
        state = restore_step(step_dir, model, optimizer, info)
        start_step, extra = state["step"], state["extra"]
    preprocess = PreprocessConfig(img_size=vq_config.img_size)
    transform = TrainImageTransform(
        preprocess, scale=config.crop_scale, hflip=config.hflip, rng=random.Random(config.seed)
    )
    paths = [p for s in config.data for p in list_images(s)]
    dataset = KeyedDataset(
        ImageDataset(list(dict.fromkeys(paths)), transform), transform, config.seed, "image"
    )
    stream = BatchStream(
        dataset,
        config.batch_size,
        _ImageCollate(),  # type: ignore[arg-type]
        rank=info.rank,
        world_size=info.world_size,
        seed=config.seed,
        num_workers=config.num_workers,
        pin_memory=cuda,
    )
    precision = autocast(device, use_bf16)
    generator = torch.Generator().manual_seed(config.seed)
    usage = torch.zeros(vq_config.codebook_size, device=device)  # this log window
    recent = torch.zeros(vq_config.codebook_size, device=device)  # since the last re-seeding
    sums = torch.zeros(3, device=device)  # loss, rec_loss, commit_loss over this log window
    counters = {"reseeded_total": 0, "window_steps": 0}
    if start_step:
        stream.load_state_dict(extra["stream"])
        generator.set_state(extra["generator"])
        recent.copy_(extra["recent"])
        usage.copy_(extra["usage"])
        sums.copy_(extra["sums"] / info.world_size)  # the ranks' total, shared out again
        counters = {k: int(extra[k]) for k in counters}
    else:
        _kmeans_init(
            model,
            stream,
            vq_config,
            config.kmeans_iters,
            info.is_main,
            generator,
            precision,
            device,
        )
    tokenizer_dir = output_dir / "tokenizer"

    def write_weights(directory: Path, _state: dict[str, Tensor]) -> None:
        # DDP only: rank 0's module holds every weight and the codebook.
        save_vqkd(model, tokenizer_dir, teacher=config.teacher)
        save_vqkd(model, directory, teacher=config.teacher)

    def save(step: int) -> None:
        save_step(
            output_dir,
            step,
            model=model,
            optimizer=optimizer,
            write_weights=write_weights,
            info=info,
            extra={
                "stream": stream.state_dict(),
                "generator": generator.get_state(),
                "recent": recent.cpu(),
                "usage": usage.cpu(),
                "sums": all_reduce_sum(sums.clone()).cpu(),
                **counters,
            },
            keep=config.keep_checkpoints,
        )

    def step_fn(step: int) -> None:
        images = cast(Tensor, next(stream)).to(device, non_blocking=cuda)
        with precision:
            targets = teacher(images)
            out = forward(images, targets)
        out.loss.backward()
        clipped_step(model, optimizer, config.grad_clip)
        counts, code_sums = model.quantize.batch_stats(out.z, out.codes)
        stats = all_reduce_sum(torch.cat([counts.unsqueeze(1), code_sums], dim=1))
        model.quantize.ema_update(stats[:, 0], stats[:, 1:])
        usage.add_(stats[:, 0])
        recent.add_(stats[:, 0])
        sums.add_(torch.stack([out.loss.detach(), out.rec_loss.detach(), out.commit_loss.detach()]))
        counters["window_steps"] += 1
        if config.reseed_every and step % config.reseed_every == 0:
            if info.is_main:
                counters["reseeded_total"] += model.quantize.reseed_dead_codes_(
                    out.z.cpu(), recent, config.dead_code_threshold, generator
                )
            _broadcast_codebook(model)
            recent.zero_()

    metrics: dict[str, float] = {}

    def on_log(step: int, lr: float) -> None:
        values = (all_reduce_sum(sums.clone()) / max(counters["window_steps"], 1)).tolist()
        world = info.world_size
        probs = usage / usage.sum().clamp(min=1)
        entropy = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
        metrics.clear()
        metrics.update(
            loss=values[0] / world,
            rec_loss=values[1] / world,
            commit_loss=values[2] / world,
            codebook_usage=float((usage > 0).float().mean()),
            codebook_perplexity=math.exp(entropy),
            codes_reseeded=float(counters["reseeded_total"]),
            lr=lr,
        )
        log.log(step, force=True, **metrics)
        usage.zero_()
        sums.zero_()
        counters["window_steps"] = 0

    if info.is_main:
        truncate_metrics(output_dir, start_step)  # a resumed run's log reads as one run
    log = RunLogger(output_dir, info.is_main, config.log_every, config.tensorboard)
    model.train()
    with log:
        run_steps(
            start_step,
            LrSchedule(config.max_steps, config.warmup_steps, config.lr, config.min_lr),
            optimizer,
            step_fn,
            log_every=config.log_every,
            save_every=config.save_every,
            on_log=on_log,
            on_save=save,
            progress=progress,
        )
    return VisualTokenizerResult(tokenizer_dir, config.max_steps, metrics)
