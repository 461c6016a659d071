"""Fine-tuning tasks: what a run trains, with which losses, and what it exports.

A task names its architecture (registered in :mod:`beit3.factory`: the init checkpoint is
loaded as it, the run trains it, ``final/`` and ``best/`` are written as it) and computes its
losses on a batch. The loop, the wrapping, checkpoints, resume and export come from
:mod:`training.finetune` and :mod:`beit3.run` and do not change with the task. A loss returns
its logits and metrics, not only a scalar, so a task can build on another's (hard negatives
for image-text matching are mined from the contrastive logits).

Register a task with :func:`register_task`; ``FinetuneConfig(task=name)`` selects it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.checkpoint import load_checkpoint, save_checkpoint
from beit3.data import PairRecord
from beit3.datasets import PairBatch
from beit3.errors import ConfigError
from beit3.heads import FUSION_LAYERS
from beit3.run import DistInfo, gather_rows, is_distributed
from beit3.tokenizer import PAD_ID
from training.loss import ClipLoss, ContrastiveOutput
from training.matching import (
    expected_calibration_error,
    fit_platt,
    matcher_pairs,
    mine_hard_negatives,
    row_hashes,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ContrastiveTask",
    "calibrate_checkpoint",
    "FinetuneTask",
    "MatchingTask",
    "TaskOutput",
    "get_task",
    "list_tasks",
    "register_task",
]


class TaskOutput(NamedTuple):
    """loss: 0-dim, what the step back-propagates. logits: name -> tensor, the scores the loss
    was computed from. metrics: name -> 0-dim detached tensor, logged with the loss."""

    loss: Tensor
    logits: dict[str, Tensor]
    metrics: dict[str, Tensor]


class FinetuneTask:
    """A fine-tuning task. Subclasses set ``name`` and ``architecture`` and implement
    :meth:`compute`.

    Args:
        info: the run's processes (losses that gather across ranks need rank and world size).
    """

    name: ClassVar[str]
    architecture: ClassVar[str]
    # Constructor arguments of the architecture beyond the config (a task's options may set them).
    architecture_args: dict[str, Any] = {}
    # Methods other than forward that evaluation calls on the model (FSDP gathers for them).
    forward_methods: ClassVar[tuple[str, ...]] = ("encode_image", "encode_text")

    def __init__(self, info: DistInfo, **options: float | str) -> None:
        if options:
            raise ConfigError(f"task {self.name!r} takes no options, got {sorted(options)}")
        self.info = info

    def compute(self, model: nn.Module, batch: PairBatch, seed: int = 0) -> TaskOutput:
        """The losses of one device-resident micro-batch (``model`` may be wrapped); ``seed``
        is the same on every rank for one micro-batch (for draws over the global batch)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Called once on the unwrapped model before it is wrapped and the optimizer is built,
        e.g. to freeze the parameters this task does not train."""

    def set_progress(self, fraction: float) -> None:
        """Called before each optimizer step with the fraction of the run done (0 at the
        first step), for a task whose settings follow a schedule; a pure function of the step,
        so a resumed run continues the same schedule."""

    def log_values(self, model: nn.Module) -> dict[str, float]:
        """Values of the (unwrapped) model worth logging, e.g. the contrastive temperature."""
        return {}

    def finish(self, checkpoints: list[Path], val: Sequence[PairRecord] | None) -> None:
        """After training, on rank 0: work on the exported checkpoint directories (``final``,
        and ``best`` when there is one), e.g. calibration on the held-out pairs."""


class ContrastiveTask(FinetuneTask):
    """The dual encoder: CLIP-style contrastive loss over the global batch (spec 6.2)."""

    name = "contrastive"
    architecture = "retrieval"

    def __init__(self, info: DistInfo, **options: float | str) -> None:
        super().__init__(info, **options)
        self.criterion = ClipLoss(dist_info=info)

    def compute(self, model: nn.Module, batch: PairBatch, seed: int = 0) -> TaskOutput:
        return self._output(self._clip(model, batch))

    def _clip(self, model: nn.Module, batch: PairBatch) -> ContrastiveOutput:
        """The contrastive loss; a :class:`training.data.NegativeBatch`'s hard-negative images
        go through the same forward as the batch's images (one module call, for DDP)."""
        negatives = getattr(batch, "negative_images", None)
        rows = batch.images.shape[0]
        images = batch.images if negatives is None else torch.cat([batch.images, negatives])
        out = model(images=images, text_ids=batch.text_ids, padding_mask=batch.padding_mask)
        if negatives is None:
            return self.criterion(out.image_embeds, out.text_embeds, out.logit_scale)
        return self.criterion(
            out.image_embeds[:rows],
            out.text_embeds,
            out.logit_scale,
            negative_embeds=out.image_embeds[rows:],
            negative_owner=batch.negative_owner,  # type: ignore[attr-defined]
        )

    @staticmethod
    def _output(clip: ContrastiveOutput) -> TaskOutput:
        logits = {"image_to_text": clip.logits_per_image, "text_to_image": clip.logits_per_text}
        metrics = {"loss_contrastive": clip.loss.detach()}
        if clip.hard_negative_logits is not None:
            hard = clip.hard_negative_logits
            logits["text_to_hard_negative"] = hard
            # How often a text's own image beats every one of its hard negatives.
            own = clip.logits_per_text.gather(1, clip.labels.unsqueeze(1)).squeeze(1)
            has = torch.isfinite(hard).any(dim=1)
            beaten = (own > hard.max(dim=1).values)[has].float()
            metrics["hard_negative_accuracy"] = (
                beaten.mean().detach() if has.any() else torch.ones(())
            )
        return TaskOutput(clip.loss, logits, metrics)

    def log_values(self, model: nn.Module) -> dict[str, float]:
        return {"logit_scale": float(model.logit_scale.detach().float().exp())}


def _gather_texts(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's texts padded to the longest over ranks, and the global batch's (no grad)."""
    length = torch.tensor([ids.shape[1]], device=ids.device)
    if is_distributed():
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = int(length) - ids.shape[1]
    if pad:
        ids = F.pad(ids, (0, pad), value=PAD_ID)
        mask = F.pad(mask, (0, pad), value=True)
    return ids, mask, gather_rows(ids), gather_rows(mask)


# The matcher's negatives: drawn at temperature 10 at the first step, 1 at the last.
ITM_TEMPERATURE = (10.0, 1.0)


class MatchingTask(ContrastiveTask):
    """Contrastive + image-text matching: the dual encoder and the fusion-encoder matcher.

    For each pair of the global batch, one hard negative text and one hard negative image are
    drawn from the contrastive similarities (:func:`training.matching.mine_hard_negatives`);
    the matcher sees the positive and both negatives in one joint forward, and binary
    cross-entropy on its logits is added to the contrastive loss with ``itm_weight``.

    Options: ``itm_weight`` (default 1.0); ``itm_temperature`` (default 10) and
    ``itm_temperature_end`` (default 1): negatives are drawn from softmax(contrastive logits /
    temperature), so above 1 they are less hard, and the temperature moves linearly from the
    first at the first step to the second at the last: a curriculum from easy negatives to
    the hardest. On the demo model, a matcher trained on the hardest negatives from
    the first step stayed at the class prior (BCE 0.636) for 80-100 steps; drawn at temperature 10
    its loss fell to 0.57 in 60 steps (README, "The matcher"). ``contrastive_weight`` (default
    1.0): 0 trains the matcher alone and freezes everything else (the dual encoder stays as
    it was: a matcher added to a fine-tuned model without changing its search results).
    ``fusion_layers`` (default :data:`beit3.heads.FUSION_LAYERS`): how many top layers the
    matcher has of its own (the architecture argument of a new matcher); ``fusion_init``: a
    checkpoint (any architecture, e.g. an MDM-pretrained one, whose joint attention was trained
    on image-text pairs) whose top layers the fusion layers start from, instead of the init's.
    """

    name = "contrastive-itm"
    architecture = "retrieval-itm"
    forward_methods = ("encode_image", "encode_text", "match_logits")

    def __init__(
        self,
        info: DistInfo,
        itm_weight: float = 1.0,
        itm_temperature: float = ITM_TEMPERATURE[0],
        itm_temperature_end: float = ITM_TEMPERATURE[1],
        contrastive_weight: float = 1.0,
        fusion_layers: float = FUSION_LAYERS,
        fusion_init: str | None = None,
    ) -> None:
        super().__init__(info)
        if fusion_layers != int(fusion_layers) or fusion_layers < 0:
            raise ConfigError(f"fusion_layers must be a whole number >= 0, got {fusion_layers}")
        self.architecture_args = {"fusion_layers": int(fusion_layers)}
        self.fusion_init = fusion_init
        if not contrastive_weight >= 0:
            raise ConfigError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        self.contrastive_weight = contrastive_weight
        end = itm_temperature_end
        if not itm_weight >= 0 or not itm_temperature > 0 or not end > 0:
            raise ConfigError(
                f"itm_weight must be >= 0 and itm_temperature(_end) > 0, got {itm_weight}, "
                f"{itm_temperature}, {end}"
            )
        self.itm_weight = itm_weight
        self.temperature_start, self.temperature_end = itm_temperature, end
        self.itm_temperature = itm_temperature

    def prepare(self, model: nn.Module) -> None:
        if self.fusion_init is not None:
            source = load_checkpoint(self.fusion_init)
            fusion = getattr(model, "itm_fusion", None)
            if fusion is None:
                raise ConfigError("fusion_init needs fusion layers (fusion_layers > 0)")
            if source.config.embed_dim != model.config.embed_dim:
                raise ConfigError(
                    f"fusion_init {self.fusion_init}: width {source.config.embed_dim}, the "
                    f"model's is {model.config.embed_dim}"
                )
            fusion.copy_from_(source.model.beit3)
            logger.info(
                "the matcher's %d fusion layers start from the top layers of %s (%s)",
                len(fusion.layers),
                self.fusion_init,
                source.model_id,
            )
        if self.contrastive_weight == 0:  # the matcher alone: freeze the rest
            for name, param in model.named_parameters():
                if not name.startswith("itm_"):
                    param.requires_grad_(False)

    def set_progress(self, fraction: float) -> None:
        start, end = self.temperature_start, self.temperature_end
        self.itm_temperature = start + (end - start) * min(max(fraction, 0.0), 1.0)

    def compute(self, model: nn.Module, batch: PairBatch, seed: int = 0) -> TaskOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.contrastive_weight > 0):
            clip = self._clip(model, batch)
        contrastive = self._output(clip)
        images, rows = batch.images, batch.images.shape[0]
        ids, mask, all_ids, all_mask = _gather_texts(batch.text_ids, batch.padding_mask)
        with torch.no_grad():
            all_images = gather_rows(images)
            all_owner = gather_rows(batch.image_index)
            all_rows = gather_rows(batch.index)
            same_image = batch.image_index.unsqueeze(1) == all_owner.unsqueeze(0)  # (B, G)
            hashes, all_hashes = row_hashes(ids, mask), row_hashes(all_ids, all_mask)
            same_text = hashes.unsqueeze(1) == all_hashes.unsqueeze(0)  # (B, G)
            neg_text, neg_image, valid_t, valid_i = mine_hard_negatives(
                clip.logits_per_image / self.itm_temperature,
                clip.logits_per_text / self.itm_temperature,
                clip.labels,
                same_image,
                same_text,
                batch.index,
                all_rows,
                seed,
            )
        # One joint forward over the positives, (image, negative text), (negative image, text).
        out = model(
            match_images=torch.cat([images, images, all_images[neg_image]]),
            match_text_ids=torch.cat([ids, all_ids[neg_text], ids]),
            match_padding_mask=torch.cat([mask, all_mask[neg_text], mask]),
        )
        targets = torch.cat([torch.ones(rows), torch.zeros(2 * rows)]).to(out.match_logits.device)
        keep = torch.cat(
            [torch.ones(rows, dtype=torch.bool, device=valid_t.device), valid_t, valid_i]
        )
        per_pair = F.binary_cross_entropy_with_logits(
            out.match_logits, targets, reduction="none"
        ) * keep.to(out.match_logits.dtype)
        # Sum over this rank's pairs / the mean number over ranks: averaged over ranks (what
        # DDP's gradient averaging optimises) it is the single-process mean on the global batch.
        count = keep.sum().float().reshape(1)
        if is_distributed():
            dist.all_reduce(count)
            count /= self.info.world_size
        itm = per_pair.sum() / count.clamp(min=1).squeeze()
        correct = ((out.match_logits > 0).float() == targets).float()[keep].mean()
        loss = self.itm_weight * itm
        if self.contrastive_weight > 0:
            loss = loss + self.contrastive_weight * contrastive.loss
        return TaskOutput(
            loss,
            {**contrastive.logits, "match": out.match_logits},
            {
                **contrastive.metrics,
                "loss_itm": itm.detach(),
                "itm_temperature": torch.tensor(self.itm_temperature, device=itm.device),
                "itm_accuracy": correct.detach() if keep.any() else torch.zeros(()),
            },
        )

    def finish(self, checkpoints: list[Path], val: Sequence[PairRecord] | None) -> None:
        """Fit the match probability's calibration (Platt scaling) on the held-out pairs
        against their hard negatives from the dual encoder's top-k, store it in each checkpoint
        (``itm_calibration``) and write ``calibration.json`` beside it."""
        if not val:
            logger.warning(
                "no --val pairs: the matcher's probabilities stay uncalibrated (sigmoid of the "
                "raw logit); fine-tune with --val to calibrate them"
            )
            return
        for path in checkpoints:
            calibrate_checkpoint(path, val)


_TASKS: dict[str, type[FinetuneTask]] = {}


def register_task(task: type[FinetuneTask]) -> type[FinetuneTask]:
    """Make ``task`` selectable by its name (usable as a class decorator)."""
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ConfigError(f"fine-tuning task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> type[FinetuneTask]:
    if name not in _TASKS:
        raise ConfigError(f"unknown fine-tuning task {name!r}; known: {', '.join(list_tasks())}")
    return _TASKS[name]


register_task(ContrastiveTask)
register_task(MatchingTask)


def calibrate_checkpoint(path: Path, records: Sequence[PairRecord], negatives: int = 3) -> dict:
    """Calibrate the matcher of the checkpoint at ``path`` on ``records`` (pairs) and save it
    back in place (its model id changes). Returns the fit and its ECE before and after."""
    ckpt = load_checkpoint(path)
    model = ckpt.matcher
    pairs = matcher_pairs(model, ckpt.tokenizer, ckpt.preprocess, records, negatives=negatives)
    before = expected_calibration_error(torch.sigmoid(pairs.logits), pairs.labels)
    scale, bias = fit_platt(pairs.logits, pairs.labels)
    model.calibrate_(scale, bias)
    after = expected_calibration_error(model.calibrated(pairs.logits), pairs.labels)
    model_id = save_checkpoint(
        model, path, preset=ckpt.preset, tokenizer=ckpt.tokenizer, preprocess=ckpt.preprocess
    )
    report = {
        "scale": scale,
        "bias": bias,
        "pairs": int(pairs.labels.numel()),
        "positives": int(pairs.labels.sum()),
        "negatives_per_query": negatives,
        "ece_uncalibrated": before,
        "ece_calibrated_on_fit_pairs": after,
        "model_id": model_id,
    }
    (Path(path) / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "calibrated the matcher of %s on %d held-out pairs: ECE %.3f -> %.3f (scale %.3f, "
        "bias %.3f)",
        path,
        report["pairs"],
        before,
        after,
        scale,
        bias,
    )
    return report
