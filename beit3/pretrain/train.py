"""The pretraining loop: masked data modeling on texts, images and pairs, under torchrun.

Run it on one process (``pretrain(config)``) or many (``torchrun --nproc_per_node 8 -m
app.cli pretrain ...``): DDP by default, FSDP2 for large and giant. Each step draws one batch of
every active kind, runs them in one forward (bf16 autocast on CUDA), computes the one loss of
:mod:`beit3.pretrain.loss`, and takes an AdamW step with warmup + cosine learning rate and
gradient clipping. The loop reads no device value except at log steps, so the GPU is never
waiting for the host. Checkpoints every ``save_every`` steps and at the end hold the model,
optimizer, step, RNG and the position of every data stream (``resume="latest"`` continues).
The final backbone is written to ``output_dir/final`` as a checkpoint directory that
fine-tuning loads with ``load_checkpoint(dir, architecture="retrieval")``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from beit3.checkpoint import (
    load_checkpoint,
    read_checkpoint_config,
    save_state_checkpoint,
    transfer_state,
)
from beit3.config import Beit3Config, create_config
from beit3.encoder import EncoderLayer
from beit3.errors import CheckpointError, ConfigError
from beit3.pretrain.config import PretrainConfig
from beit3.pretrain.data import MaskedBatch, build_streams
from beit3.pretrain.loss import PARTS, MaskedModelingLoss, MaskedStats, masked_cross_entropy
from beit3.pretrain.model import DEFAULT_CODEBOOK_SIZE, Beit3ForPretraining, PretrainingOutput
from beit3.pretrain.vqkd import VQKD, load_vqkd
from beit3.run import (
    LrSchedule,
    RunLogger,
    all_reduce_sum,
    autocast,
    barrier,
    build_adamw,
    choose_strategy,
    clipped_step,
    full_model_state,
    init_distributed,
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
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig

__all__ = [
    "PretrainResult",
    "StepModule",
    "StepOutput",
    "build_optimizer",
    "compile_layers",
    "load_pretrained",
    "model_config",
    "pretrain",
    "train_step",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class PretrainResult:
    """checkpoint: the final checkpoint directory; metrics: the last logged metrics."""

    output_dir: Path
    checkpoint: Path
    model_id: str
    steps: int
    metrics: dict[str, float]


def _resolve_tokenizer(config: PretrainConfig) -> Path:
    if config.tokenizer:
        return Path(config.tokenizer)
    if config.init_from and (Path(config.init_from) / "tokenizer").is_dir():
        return Path(config.init_from) / "tokenizer"
    raise ConfigError(
        "pretraining needs a text tokenizer: pass tokenizer (--tokenizer, a "
        "sentencepiece model; 'beit3 tokenizer train-text' makes one) or init_from"
    )


def _needs_images(config: PretrainConfig) -> bool:
    return bool(
        (config.pair_data and config.pair_batch_size)
        or (config.image_data and config.image_batch_size)
    )


def model_config(config: PretrainConfig) -> Beit3Config:
    """The backbone config of a run: its preset, overrides, drop path and checkpointing."""
    overrides = {
        "drop_path_rate": config.drop_path_rate,
        "use_checkpoint": config.use_checkpoint,
        **config.model_overrides,
    }
    return create_config(config.preset, **overrides)


def _load_init(model: Beit3ForPretraining, path: Path) -> None:
    """Start from a checkpoint directory: the backbone strictly, heads when they fit."""
    from safetensors.torch import load_file

    meta = read_checkpoint_config(path)
    state = load_file(str(path / "model.safetensors"))
    transfer_state(model, state, source=str(path), preset=meta["preset"])
    logger.info("initialised from %s (%s)", path, meta.get("model_id", "?"))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Beit3ForPretraining:
    """Load a pretraining checkpoint directory with its heads, in eval mode."""
    model = load_checkpoint(path, device=device).model
    if not isinstance(model, Beit3ForPretraining):
        raise CheckpointError(
            f"{path} is not a pretraining checkpoint (it has no MLM/MIM heads); "
            "load it with beit3.load_checkpoint"
        )
    return model


def _unused_parameters(kinds: set[str], config: PretrainConfig) -> bool:
    """Whether some parameter gets no gradient in a step (DDP must then look for it)."""
    vision = bool(kinds & {"image", "pair"})
    language = bool(kinds & {"text", "pair"})
    mlm = ("text" in kinds and config.text_mask_ratio > 0) or (
        "pair" in kinds and config.pair_text_mask_ratio > 0
    )
    mim = ("image" in kinds and config.image_mask_ratio > 0) or (
        "pair" in kinds and config.pair_image_mask_ratio > 0
    )
    return not (vision and language and mlm and mim)


class StepModule(nn.Module):
    """Runs every kind of batch of one step through the model: one forward, so DDP and FSDP
    reduce the gradients once per step."""

    def __init__(self, model: Beit3ForPretraining) -> None:
        super().__init__()
        self.model = model

    def forward(self, batches: Mapping[str, MaskedBatch]) -> dict[str, PretrainingOutput]:
        return {
            kind: self.model(
                images=b.images,
                text_ids=b.text_ids,
                padding_mask=b.padding_mask,
                image_mask=b.image_mask,
                text_positions=b.text_positions,
                image_positions=b.image_positions,
            )
            for kind, b in batches.items()
        }


def _step_parts(
    batches: dict[str, MaskedBatch], outputs: dict[str, Any], codes: dict[str, torch.Tensor]
) -> dict[str, MaskedStats]:
    stats: dict[str, MaskedStats] = {}
    for kind, batch in batches.items():
        out = outputs[kind]
        if out.mlm_logits is not None:
            assert batch.text_targets is not None, "masked text comes with its targets"
            stats["text_mlm" if kind == "text" else "pair_mlm"] = masked_cross_entropy(
                out.mlm_logits, batch.text_targets
            )
        if out.mim_logits is not None:
            assert batch.image_positions is not None, "masked images come with positions"
            targets = torch.gather(codes[kind], 1, batch.image_positions)  # (B, Ki)
            stats["image_mim" if kind == "image" else "pair_mim"] = masked_cross_entropy(
                out.mim_logits, targets
            )
    return stats


def build_optimizer(
    model: torch.nn.Module, config: PretrainConfig, device: torch.device, strategy: str = "none"
) -> torch.optim.AdamW:
    """AdamW over the official weight-decay groups (:func:`beit3.run.build_adamw`)."""
    return build_adamw(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=config.betas,
        eps=config.eps,
        device=device,
        strategy=strategy,
        fused=config.fused_optimizer,
    )


def compile_layers(model: Beit3ForPretraining) -> None:
    """Compile each encoder layer in place (regional compilation: the layers share their graphs,
    one per input layout (text, image, pair), so building is quick; state-dict keys stay as
    they are, unlike ``torch.compile(model)``).

    Each layer has its own stochastic-depth rate. The rate enters the math as a tensor buffer,
    so the layers share graphs, but the float still reaches the guards (the ``drop_path > 0``
    test): four layers with four rates built 2 graphs for one input layout, not 4 (torch 2.13,
    counted with a counting backend). The recompile limit still covers one graph per rate, so a
    deep model never falls back to eager (``drop_path_rate=0`` needs one graph per layout).
    """
    import torch._dynamo.config as dynamo_config

    layers = model.beit3.encoder.layers
    rates = {float(cast(EncoderLayer, layer).drop_path) for layer in layers}
    needed = 3 * len(rates) + 2  # 3 layouts per rate, plus slack for a short last batch
    if needed > dynamo_config.recompile_limit:
        logger.warning(
            "torch.compile: %d distinct drop-path rates give %d layer graphs to build "
            "(set drop_path_rate=0 for 3)",
            len(rates),
            3 * len(rates),
        )
        dynamo_config.recompile_limit = needed
    for layer in layers:
        layer.compile()


@dataclass
class StepOutput:
    """stats: part -> MaskedStats; codes: kind -> (B, N) visual codes; grad_norm: 0-dim."""

    stats: dict[str, MaskedStats]
    codes: dict[str, torch.Tensor]
    grad_norm: torch.Tensor


def train_step(
    forward: torch.nn.Module,
    model: Beit3ForPretraining,
    optimizer: torch.optim.Optimizer,
    loss_fn: MaskedModelingLoss,
    batches: dict[str, MaskedBatch],
    vqkd: VQKD | None,
    *,
    world_size: int = 1,
    bf16: bool = False,
    grad_clip: float = 0.0,
) -> StepOutput:
    """One optimisation step on device-resident batches; reads nothing back to the host.

    Args:
        forward: the (possibly DDP-wrapped) :class:`StepModule`.
        model: the underlying model (for clipping).
        optimizer, loss_fn: as built by :func:`pretrain`.
        batches: kind -> :class:`MaskedBatch` on the model's device.
        vqkd: the visual tokenizer (None when no batch has images).
        world_size: processes whose gradients are averaged.
        bf16: bf16 autocast (CUDA).
        grad_clip: max gradient norm (0 = no clipping; the norm is still returned).
    """
    codes: dict[str, torch.Tensor] = {}
    with autocast(next(model.parameters()).device, bf16):
        if vqkd is not None:
            codes = {
                k: vqkd.encode(b.images)
                for k, b in batches.items()
                if b.images is not None and b.image_positions is not None
            }
        outputs = forward(batches)
    stats = _step_parts(batches, outputs, codes)
    counts = all_reduce_sum(torch.stack([s.count for s in stats.values()]))
    loss = loss_fn(stats, dict(zip(stats, counts, strict=True)), world_size)
    loss.backward()
    return StepOutput(stats, codes, clipped_step(model, optimizer, grad_clip))


class _Window:
    """Device-side sums of the metrics between two log steps (read only when logging)."""

    def __init__(self, device: torch.device, codebook_size: int, world_size: int) -> None:
        self.parts = list(PARTS)
        self.device = device
        self.world_size = world_size
        self.sums = torch.zeros(len(self.parts), 3, dtype=torch.float64, device=device)
        self.codes = torch.zeros(codebook_size, dtype=torch.float64, device=device)
        self.steps = self.samples = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, stats: dict[str, MaskedStats], codes: dict[str, torch.Tensor]) -> None:
        for part, s in stats.items():
            row = self.parts.index(part)
            self.sums[row] += torch.stack([s.loss_sum.detach(), s.count, s.correct]).double()
        for c in codes.values():
            flat = c.reshape(-1)  # index_add_, not bincount: no device-to-host sync
            self.codes.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def read(self, weights: dict[str, float]) -> dict[str, float]:
        sums, codes = (
            all_reduce_sum(self.sums.clone()),
            all_reduce_sum(self.codes.clone()),
        )
        values = sums.cpu().tolist()
        metrics: dict[str, float] = {}
        total = 0.0
        for part, (loss_sum, count, correct) in zip(self.parts, values, strict=True):
            if count > 0:
                metrics[f"loss_{part}"] = loss_sum / count
                metrics[f"acc_{part}"] = correct / count
                total += weights[PARTS[part]] * loss_sum / count
        metrics["loss"] = total
        if codes.sum() > 0:
            metrics["codebook_usage"] = float((codes > 0).double().mean())
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        world = self.world_size
        metrics["samples_per_s"] = self.samples * world / elapsed
        metrics["tokens_per_s"] = self.tokens * world / elapsed
        metrics["step_time_s"] = elapsed / max(self.steps, 1)
        self.sums.zero_()
        self.codes.zero_()
        self.steps = self.samples = self.tokens = 0
        self.start = time.perf_counter()
        return metrics


def pretrain(config: PretrainConfig, progress: Progress | None = None) -> PretrainResult:
    """Run (or resume) a pretraining job; see the module docstring.

    Args:
        config: the run (``PretrainConfig(preset="beit3-tiny", max_steps=2, ...)`` is a smoke run).
        progress: called as ``progress(step, max_steps)`` after every step.

    Returns:
        :class:`PretrainResult` with the final checkpoint directory.

    Raises:
        ConfigError, InputDataError, CheckpointError: bad configuration, data or checkpoints.
    """
    info = init_distributed(config.device)
    device = info.device
    cuda = device.type == "cuda"
    use_bf16 = resolve_bf16(config.precision, device)
    config = config.replace(
        static_shapes=config.compile if config.static_shapes is None else config.static_shapes
    )
    output_dir = Path(config.output_dir)
    if info.is_main:
        write_run_config(output_dir, config)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    spm = _resolve_tokenizer(config)
    tokenizer = TextTokenizer(spm, max_len=config.pair_max_len)
    cfg = model_config(config)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but {config.preset}'s "
            f"text table has {cfg.vocab_size} rows; set model_overrides vocab_size"
        )
    vqkd: VQKD | None = None
    if config.visual_tokenizer:
        vqkd = load_vqkd(config.visual_tokenizer, device=device)
        if (vqkd.config.img_size, vqkd.config.grid_size) != (cfg.img_size, cfg.grid_size):
            raise ConfigError(
                f"visual tokenizer {config.visual_tokenizer} works on {vqkd.config.img_size}-px "
                f"images with a {vqkd.config.grid_size}x{vqkd.config.grid_size} grid; "
                f"{config.preset} has {cfg.img_size}-px images and a {cfg.grid_size}x"
                f"{cfg.grid_size} grid: train a tokenizer for this size"
            )
    elif _needs_images(config):
        raise ConfigError(
            "pretraining on images needs a visual tokenizer: train one with "
            "'beit3 tokenizer train-visual' and pass visual_tokenizer "
            "(--visual-tokenizer), or set the image and pair batch sizes to 0"
        )

    torch.manual_seed(config.seed)  # same initial weights on every rank
    codebook_size = vqkd.config.codebook_size if vqkd else DEFAULT_CODEBOOK_SIZE
    model = Beit3ForPretraining(cfg, codebook_size=codebook_size)
    if config.init_from:
        _load_init(model, Path(config.init_from))

    step_dir = resume_step_dir(config.resume, output_dir)
    if step_dir is not None:
        load_step_weights(step_dir, model, preset=config.preset)
    model.to(device)
    if config.compile:
        compile_layers(model)  # before FSDP wraps the layers, as torchtitan does
    streams = build_streams(
        config,
        spm,
        img_size=cfg.img_size,
        grid_size=cfg.grid_size,
        use_images=vqkd is not None,
        rank=info.rank,
        world_size=info.world_size,
        pin_memory=cuda,
    )
    strategy = choose_strategy(config.strategy, info, cfg.embed_dim)
    forward = wrap_model(
        model,
        strategy,
        info,
        step_module=StepModule(model),
        find_unused_parameters=_unused_parameters(set(streams), config),
    )
    optimizer = build_optimizer(model, config, device, strategy)
    start_step, extra = 0, {}
    rng_restored = False
    if step_dir is not None:
        state = restore_step(step_dir, model, optimizer, info)
        start_step, extra, rng_restored = state["step"], state["extra"], state["rank_rng_restored"]
    if not rng_restored:
        torch.manual_seed(config.seed + 1000 * start_step + info.rank)  # drop path per rank
    for kind, stream in streams.items():
        if kind in extra.get("streams", {}):
            stream.load_state_dict(extra["streams"][kind])
    logger.info(
        "pretraining %s on %s: streams %s, steps %d..%d, %s, %s",
        config.preset,
        device,
        ", ".join(f"{k} x{s.batch_size}" for k, s in streams.items()),
        start_step,
        config.max_steps,
        "bf16" if use_bf16 else "fp32",
        strategy,
    )

    loss_fn = MaskedModelingLoss(config.text_weight, config.image_weight, config.pair_weight)
    if info.is_main:
        truncate_metrics(output_dir, start_step)  # a resumed run's log reads as one run
    log = RunLogger(output_dir, info.is_main, config.log_every, config.tensorboard)
    window = _Window(device, codebook_size, info.world_size)
    metrics: dict[str, float] = {}
    num_vision = cfg.num_vision_tokens
    preprocess = PreprocessConfig(img_size=cfg.img_size, max_text_len=config.pair_max_len)

    def write_checkpoint(directory: Path, state: dict[str, torch.Tensor]) -> None:
        save_state_checkpoint(
            model,
            state,
            directory,
            preset=config.preset,
            tokenizer=tokenizer,
            preprocess=preprocess,
        )

    def save(step: int) -> None:
        save_step(
            output_dir,
            step,
            model=model,
            optimizer=optimizer,
            write_weights=write_checkpoint,
            info=info,
            extra={"streams": {k: s.state_dict() for k, s in streams.items()}},
            keep=config.keep_checkpoints,
        )

    last: dict[str, Any] = {}

    def step_fn(step: int) -> None:
        batches = {
            kind: next(stream).to(device, non_blocking=cuda) for kind, stream in streams.items()
        }
        out = train_step(
            forward,
            model,
            optimizer,
            loss_fn,
            batches,
            vqkd,
            world_size=info.world_size,
            bf16=use_bf16,
            grad_clip=config.grad_clip,
        )
        last["grad_norm"] = out.grad_norm
        window.add(out.stats, out.codes)
        window.steps += 1
        window.samples += sum(b.size for b in batches.values())
        window.tokens += sum(
            b.size * (num_vision if b.images is not None else 0)
            + (b.text_ids.numel() if b.text_ids is not None else 0)
            for b in batches.values()
        )

    def on_log(step: int, lr: float) -> None:
        metrics.clear()
        metrics.update(window.read(loss_fn.weights))
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {step}; lower the "
                "learning rate or check the data"
            )
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        norm = last["grad_norm"]
        metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        log.log(step, force=True, **metrics)

    model.train()
    with log:
        step = run_steps(
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

    final = output_dir / "final"
    if start_step < config.max_steps or not final.exists():
        state = full_model_state(model)  # a collective under FSDP
        model_id = ""
        if info.is_main:
            model_id = save_state_checkpoint(
                model,
                state,
                final,
                preset=config.preset,
                tokenizer=tokenizer,
                preprocess=preprocess,
            )
    else:  # resumed a finished run: nothing to train
        model_id = read_checkpoint_config(final).get("model_id", "")
    barrier()
    logger.info("pretraining done: %d steps, final checkpoint %s", step, final)
    return PretrainResult(output_dir, final, model_id, step, metrics)
