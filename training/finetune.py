"""Contrastive fine-tuning of the BEiT-3 dual encoder on image-text pairs (spec 6).

One process or many (``torchrun``: DDP, or FSDP sharded per encoder layer). Per optimizer step:
``accum_steps`` micro-batches, each a contrastive batch gathered across ranks (ClipLoss), AdamW
with the official weight-decay and layer-decay groups, lr from warmup + cosine set per step, bf16
autocast on CUDA. Output directory::

    run_config.json          the resolved config, git SHA, versions
    metrics.jsonl            one record per logged step (loss, lr, ...) and per evaluation (val/*)
    tensorboard/             the same scalars
    checkpoints/step-N/      resumable: a checkpoint directory + trainer_state.pt
    tokenizer/               the sentencepiece model trained for a from-scratch run
    best/, best.json         the checkpoint with the best mean val recall (with --val)
    final/                   the finished model, ready for ``beit3 index``
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from beit3.checkpoint import load_checkpoint
from beit3.config import get_preset
from beit3.data import is_shard_source, read_captions, read_pairs
from beit3.datasets import PairBatch
from beit3.errors import ConfigError
from beit3.factory import create_model
from beit3.run import (
    DistInfo,
    LrSchedule,
    RunLogger,
    all_mean,
    autocast,
    barrier,
    build_adamw,
    choose_strategy,
    clipped_step,
    grad_sync,
    init_distributed,
    load_step_weights,
    resolve_bf16,
    restore_step,
    resume_step_dir,
    run_steps,
    save_step,
    sync_unsharded_grads,
    truncate_metrics,
    wrap_model,
    write_run_config,
)
from beit3.tokenizer import PAD_ID, TextTokenizer, train_sentencepiece
from beit3.transforms import PreprocessConfig
from training.config import FinetuneConfig
from training.data import TrainData, nearest_pairs
from training.evaluate import embed_pairs, evaluate_model
from training.state import (
    Start,
    batch_identity,
    check_same_batches,
    export_model,
    write_model,
)
from training.tasks import FinetuneTask, TaskOutput, get_task

__all__ = ["build_optimizer", "finetune", "forward_backward"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
WARMUP_FRACTION = 0.2  # official: 3 of 15 epochs (COCO), 5 of 20 (Flickr30K: 0.25)
LAYER_DECAY_FROM_CHECKPOINT = 0.65  # official base recipe
GRAD_CLIP_FROM_SCRATCH = 0.3  # see FinetuneConfig.grad_clip


def finetune(config: FinetuneConfig, progress: ProgressFn | None = None) -> Path:
    """Fine-tune (or train from scratch) a retrieval model; runs under torchrun too.

    Args:
        config: the run.
        progress: called on rank 0 as ``progress(step, total_steps)`` after every step.

    Returns:
        ``output_dir/final``, a checkpoint directory.

    Raises:
        ConfigError, InputDataError, CheckpointError: bad settings or inputs, named.
    """
    info = init_distributed(config.device)
    use_bf16 = resolve_bf16(config.precision, info.device)
    task = get_task(config.task)(info, **config.task_options)
    out = Path(config.output_dir)
    resume_from = resume_step_dir(config.resume, out)
    if is_shard_source(config.train) and config.max_steps is None:
        raise ConfigError(
            f"{config.train}: WebDataset shards have no known length; "
            "give the run length with --max-steps"
        )

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    start = _build_start(config, task, info, out)
    model = start.model
    # Only masked image modeling uses the mask token; DDP insists every trained parameter
    # gets a gradient.
    model.beit3.vision_embed.mask_token.requires_grad_(False)
    task.prepare(model)
    data = TrainData(
        config.train,
        tokenizer=start.tokenizer,
        preprocess=start.preprocess,
        batch_size=config.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=config.seed,
        num_workers=config.num_workers,
        image_column=config.image_column,
        text_column=config.text_column,
        crop_scale=config.crop_scale,
        hflip=config.hflip,
        shuffle_buffer=config.shuffle_buffer,
        pin_memory=info.device.type == "cuda",
        max_negatives=config.max_negatives,
    )
    if config.neighbour_batches:
        neighbours = _start_neighbours(config, start, data, info, out, fresh=resume_from is None)
        data.use_neighbours(neighbours, config.neighbour_batches)
    val_records = (
        read_pairs(config.val, config.image_column, config.text_column) if config.val else None
    )
    total_steps = config.max_steps or math.ceil(
        config.epochs * data.batches_per_epoch / config.accum_steps
    )  # type: ignore[operator]
    warmup = (
        config.warmup_steps
        if config.warmup_steps is not None
        else round(WARMUP_FRACTION * total_steps)
    )
    layer_decay = (
        config.layer_decay
        if config.layer_decay is not None
        else (LAYER_DECAY_FROM_CHECKPOINT if config.init else 1.0)
    )
    grad_clip = (
        config.grad_clip
        if config.grad_clip is not None
        else (0.0 if config.init else GRAD_CLIP_FROM_SCRATCH)
    )
    strategy = choose_strategy(config.strategy, info, model.config.embed_dim)
    resolved = config.replace(
        max_steps=total_steps,
        warmup_steps=warmup,
        layer_decay=layer_decay,
        grad_clip=grad_clip,
        strategy=strategy,
        precision="bf16" if use_bf16 else "fp32",
        spm=config.spm if config.init is None else None,
        max_text_len=start.preprocess.max_text_len,
        img_size=model.config.img_size,
        eval_batch_size=config.eval_batch_size or config.batch_size,
    )
    if info.is_main:
        write_run_config(
            out,
            {
                **dataclasses.asdict(resolved),
                "preset": start.preset,
                "init_model_id": start.init_model_id,
                "world_size": info.world_size,
                "device": str(info.device),
                "num_train_pairs": data.num_pairs,
                "steps_per_epoch": data.batches_per_epoch // config.accum_steps
                if data.batches_per_epoch
                else None,
                "global_batch_size": config.batch_size * info.world_size,
            },
        )

    if config.temperature is not None:  # a resumed run's own scale is loaded below
        _set_temperature(model, config.temperature)
    # Resumed weights go in before wrapping (FSDP shards whatever the module holds).
    if resume_from is not None:
        load_step_weights(resume_from, model, preset=start.preset)
    model.to(info.device)
    wrapped = wrap_model(model, strategy, info, forward_methods=task.forward_methods)
    optimizer = build_optimizer(
        model, config.replace(layer_decay=layer_decay), info.device, strategy
    )
    step, best = 0, {"average": -math.inf, "step": 0}
    if resume_from is not None:
        restored = restore_step(resume_from, model, optimizer, info)
        extra = restored["extra"]
        check_same_batches(extra, config, info, resume_from)
        step, best = restored["step"], extra["best"]
        data.set_position(**extra["data"])
    else:
        torch.manual_seed(config.seed + info.rank)  # distinct drop-path masks per rank
    if info.is_main:
        truncate_metrics(out, step)
    run_log = RunLogger(out, info.is_main, config.log_every, config.tensorboard)
    if info.is_main:
        logger.info(
            "fine-tuning %s (%s)%s: %s pairs, %d steps from step %d, global batch %d x %d accum "
            "on %d process(es) (%s, %s)",
            start.preset,
            task.name,
            f" from {config.init}" if config.init else " from scratch",
            data.num_pairs if data.num_pairs is not None else "streamed",
            total_steps,
            step,
            config.batch_size * info.world_size,
            config.accum_steps,
            info.world_size,
            strategy,
            "bf16" if use_bf16 else "fp32",
        )
    loop = _Loop(
        config.replace(grad_clip=grad_clip),
        info,
        task,
        start,
        data,
        wrapped,
        optimizer,
        strategy,
        use_bf16,
        run_log,
        val_records,
        total_steps,
        best,
    )
    with run_log:
        run_steps(
            step,
            LrSchedule(total_steps, warmup, config.lr, config.min_lr),
            optimizer,
            loop.step,
            log_every=config.log_every,
            save_every=config.save_every,
            on_log=loop.log,
            on_save=loop.save,
            after_step=loop.maybe_evaluate,
            progress=progress if info.is_main else None,
        )
    final = out / "final"
    export_model(start, final, info)
    if info.is_main:
        task.finish([p for p in (final, out / "best") if p.is_dir()], val_records)
    barrier()
    if info.is_main:
        logger.info(
            "finished %d steps in %.1f s; skipped %d samples with unreadable images; "
            "final model in %s",
            total_steps,
            time.monotonic() - loop.began,
            loop.skipped,
            final,
        )
    return final


class _Loop:
    """A fine-tuning run's step function and its duties at log, evaluation and save steps
    (the loop itself is :func:`beit3.run.run_steps`)."""

    def __init__(
        self,
        config: FinetuneConfig,
        info: DistInfo,
        task: FinetuneTask,
        start: Start,
        data: TrainData,
        wrapped: nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy: str,
        use_bf16: bool,
        run_log: RunLogger,
        val_records: list | None,
        total_steps: int,
        best: dict[str, Any],
    ) -> None:
        self.config, self.info, self.task, self.start, self.data = config, info, task, start, data
        self.wrapped, self.model, self.optimizer = wrapped, start.model, optimizer
        self.strategy, self.use_bf16, self.run_log = strategy, use_bf16, run_log
        self.val_records, self.total_steps, self.best = val_records, total_steps, best
        self.out = Path(config.output_dir)
        self.skipped = 0
        self.batches = self._batches()
        self.losses: list[Tensor] = []
        self.metrics: dict[str, Tensor] = {}
        self.grad_norm = torch.zeros(())
        self.window_samples = 0
        self.began = self.window_start = time.monotonic()
        self.wrapped.train()

    def step(self, step: int) -> None:
        """One optimizer step: ``accum_steps`` micro-batches, each its own task batch."""
        accum = self.config.accum_steps
        self.losses = []
        self.task.set_progress((step - 1) / max(self.total_steps, 1))
        for micro in range(accum):
            batch = next(self.batches)
            with grad_sync(self.wrapped, self.strategy, enabled=micro == accum - 1):
                # The same draw seed on every rank, a new one per micro-batch (and on resume).
                seed = self.config.seed * 1_000_003 + (step - 1) * accum + micro
                out = forward_backward(
                    self.wrapped, self.task, batch, self.info.device, self.use_bf16, 1 / accum, seed
                )
            self.losses.append(out.loss)
            self.metrics = out.metrics
            self.window_samples += batch.images.shape[0]
        sync_unsharded_grads(self.wrapped, self.strategy)
        self.grad_norm = clipped_step(self.wrapped, self.optimizer, self.config.grad_clip or 0.0)

    def log(self, step: int, lr: float) -> None:
        device = self.info.device
        samples = all_mean(torch.tensor(float(self.window_samples), device=device))
        now = time.monotonic()
        self.run_log.log(
            step,
            force=True,
            loss=all_mean(torch.stack(self.losses).mean()),
            **{k: all_mean(v) for k, v in self.metrics.items()},
            lr=lr,
            grad_norm=self.grad_norm,  # before clipping
            **self.task.log_values(self.model),
            epoch=self._epoch(),
            samples_per_s=samples * self.info.world_size / max(now - self.window_start, 1e-9),
        )
        self.window_start, self.window_samples = now, 0

    def _batches(self) -> Iterator[PairBatch]:
        """Training batches; a batch whose images were all unreadable is skipped on one process
        and replaced by an empty batch under several (every rank must take the same steps)."""
        size = self.data.batch_size
        for batch in self.data:
            if batch is None:
                self.skipped += size
                if self.info.world_size == 1:
                    continue
                batch = _empty_batch(self.start.preprocess.img_size)
            else:
                self.skipped += size - batch.images.shape[0]
            yield batch

    def _epoch(self) -> float:
        per = self.data.batches_per_epoch
        return self.data.epoch + (self.data.batch / per if per else 0.0)

    def maybe_evaluate(self, step: int) -> None:
        """Evaluate on the val pairs every ``eval_every`` steps and at the end; keep the best."""
        config = self.config
        if self.val_records is None:
            return
        due = config.eval_every is not None and step % config.eval_every == 0
        if not (due or step == self.total_steps):
            return
        eval_model = self.wrapped if self.strategy == "fsdp" else self.model
        metrics = evaluate_model(
            eval_model,
            self.start.tokenizer,
            self.start.preprocess,
            self.val_records or [],
            dist_info=self.info,
            batch_size=config.eval_batch_size or config.batch_size,
            num_workers=config.num_workers,
            use_bf16=self.use_bf16,
        )
        recalls = {k: v for k, v in metrics.items() if k.startswith(("i2t_", "t2i_", "average"))}
        self.run_log.log(step, force=True, **{f"val/{k}": v for k, v in recalls.items()})
        # An equal later score replaces the best (a run whose dual encoder is frozen, e.g. a
        # matcher-only one, keeps its latest matcher).
        if recalls["average"] >= self.best["average"]:
            self.best = {"average": recalls["average"], "step": step}
            export_model(self.start, self.out / "best", self.info)
            if self.info.is_main:
                (self.out / "best.json").write_text(
                    json.dumps({"step": step, **metrics}, indent=2) + "\n"
                )
                logger.info("new best mean recall %.4f at step %d", recalls["average"], step)

    def save(self, step: int) -> None:
        save_step(
            self.out,
            step,
            model=self.model,
            optimizer=self.optimizer,
            write_weights=lambda directory, state: write_model(state, self.start, directory),
            info=self.info,
            extra={
                "data": self.data.position(),
                "best": self.best,
                "batch": batch_identity(self.config, self.info),
            },
            keep=self.config.keep_checkpoints,
        )


def build_optimizer(
    model: nn.Module, config: FinetuneConfig, device: torch.device, strategy: str = "none"
) -> torch.optim.AdamW:
    """AdamW over the official groups (no decay for 1-D tensors, biases, cls token, vision
    positions, logit_scale; lr scale layer_decay^(L + 1 - layer id)): :func:`beit3.run.build_adamw`."""
    return build_adamw(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=config.betas,
        eps=config.eps,
        device=device,
        strategy=strategy,
        layer_decay=config.layer_decay,
    )


def forward_backward(
    model: nn.Module,
    task: FinetuneTask,
    batch: PairBatch,
    device: torch.device,
    use_bf16: bool,
    scale: float = 1.0,
    seed: int = 0,
) -> TaskOutput:
    """One micro-batch: the task's losses, backward of ``scale x loss``; ``seed`` for the
    task's draws (the same on every rank).

    Returns:
        The task's output with the loss detached.
    """
    batch = type(batch)(*(t.to(device, non_blocking=True) for t in batch))  # or NegativeBatch
    with autocast(device, enabled=use_bf16):
        out = task.compute(model, batch, seed)
    (out.loss * scale).backward()
    return out._replace(loss=out.loss.detach())


def _empty_batch(img_size: int) -> PairBatch:
    ids = torch.full((0, 2), PAD_ID, dtype=torch.long)
    return PairBatch(
        torch.zeros(0, 3, img_size, img_size),
        ids,
        ids.eq(PAD_ID),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
    )


# Setup -------------------------------------------------------------------------------------


def _build_start(config: FinetuneConfig, task: FinetuneTask, info: DistInfo, out: Path) -> Start:
    knobs = {"drop_path_rate": config.drop_path_rate, "use_checkpoint": config.use_checkpoint}
    if config.init is not None:
        # At another img_size the position table is resized (the official fine-tuning at 384
        # from 224 does the same).
        ckpt = load_checkpoint(
            config.init,
            architecture=task.architecture,
            architecture_args=task.architecture_args,
            img_size=config.img_size,
            **knobs,
        )
        preprocess, tokenizer = ckpt.preprocess, ckpt.tokenizer
        if config.max_text_len is not None and config.max_text_len != preprocess.max_text_len:
            preprocess = dataclasses.replace(preprocess, max_text_len=config.max_text_len)
            tokenizer = TextTokenizer(tokenizer.path, max_len=config.max_text_len)
        base = get_preset(ckpt.preset)
        export = ckpt.config.replace(
            drop_path_rate=base.drop_path_rate, use_checkpoint=base.use_checkpoint
        )
        model = ckpt.model.train()
        return Start(model, tokenizer, preprocess, ckpt.preset, ckpt.model_id, export)
    assert config.preset is not None
    max_len = config.max_text_len or 64
    spm = Path(config.spm) if config.spm else _own_tokenizer(config, info, out)
    tokenizer = TextTokenizer(spm, max_len=max_len)
    overrides: dict[str, Any] = {"vocab_size": tokenizer.vocab_size}
    if config.img_size is not None:
        overrides["img_size"] = config.img_size
    model = create_model(
        config.preset, task.architecture, **overrides, **knobs, **task.architecture_args
    )
    base = get_preset(config.preset)
    export = model.config.replace(
        drop_path_rate=base.drop_path_rate, use_checkpoint=base.use_checkpoint
    )
    preprocess = PreprocessConfig(img_size=model.config.img_size, max_text_len=max_len)
    return Start(model, tokenizer, preprocess, config.preset, None, export)


def _start_neighbours(
    config: FinetuneConfig, start: Start, data: TrainData, info: DistInfo, out: Path, fresh: bool
) -> Tensor:
    """The start model's nearest pairs of every training pair (:func:`training.data.nearest_pairs`),
    computed once by rank 0 and kept in ``out/neighbours.safetensors``, so a resumed run (and
    every rank) builds the same batches from the start model, whatever the weights are now; a
    fresh run computes them again."""
    path = out / "neighbours.safetensors"
    if data.records is None:
        raise ConfigError(
            f"{config.train}: --neighbour-batches needs a manifest or caption folder "
            "(a shard stream has no random access)"
        )
    if info.is_main and (fresh or not path.is_file()):
        began = time.monotonic()
        model = start.model.to(info.device)
        image_embeds, text_embeds = embed_pairs(
            model,
            start.tokenizer,
            start.preprocess,
            data.records,
            batch_size=config.eval_batch_size or config.batch_size,
            num_workers=config.num_workers,
        )
        model.cpu()
        k = min(4 * config.neighbour_batches, 64)
        neighbours = nearest_pairs(image_embeds, text_embeds, [r.image_id for r in data.records], k)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"neighbours": neighbours}, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
        logger.info(
            "neighbour batches: the start model's %d nearest pairs of each of %d pairs in %.1f s",
            k,
            len(data.records),
            time.monotonic() - began,
        )
    barrier()
    return load_file(str(path))["neighbours"]


def _set_temperature(model: nn.Module, temperature: float) -> None:
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise ConfigError(f"temperature: the {type(model).__name__} model has no logit scale")
    with torch.no_grad():
        scale.fill_(math.log(1 / temperature))


def _own_tokenizer(config: FinetuneConfig, info: DistInfo, out: Path) -> Path:
    """A sentencepiece model trained on the training captions (kept for resumption)."""
    path = out / "tokenizer" / "sentencepiece.bpe.model"
    if info.is_main and not path.is_file():
        started = time.monotonic()
        # The first 2M captions are plenty (and spare a full pass over large shard sets).
        texts = itertools.islice(
            read_captions(config.train, config.image_column, config.text_column), 2_000_000
        )
        train_sentencepiece(texts, path, vocab_size=config.spm_vocab_size)
        logger.info(
            "trained a sentencepiece tokenizer on the training captions (%.1f s): %s",
            time.monotonic() - started,
            path,
        )
    barrier()
    return path
