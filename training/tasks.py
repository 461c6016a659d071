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

from typing import ClassVar, NamedTuple

from torch import Tensor, nn

from beit3.data import PairBatch
from beit3.errors import ConfigError
from beit3.run import DistInfo
from training.loss import ClipLoss

__all__ = [
    "ContrastiveTask",
    "FinetuneTask",
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
    # Methods other than forward that evaluation calls on the model (FSDP gathers for them).
    forward_methods: ClassVar[tuple[str, ...]] = ("encode_image", "encode_text")

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def compute(self, model: nn.Module, batch: PairBatch) -> TaskOutput:
        """The losses of one device-resident micro-batch (``model`` may be wrapped)."""
        raise NotImplementedError

    def log_values(self, model: nn.Module) -> dict[str, float]:
        """Values of the (unwrapped) model worth logging, e.g. the contrastive temperature."""
        return {}


class ContrastiveTask(FinetuneTask):
    """The dual encoder: CLIP-style contrastive loss over the global batch (spec 6.2)."""

    name = "contrastive"
    architecture = "retrieval"

    def __init__(self, info: DistInfo) -> None:
        super().__init__(info)
        self.criterion = ClipLoss(dist_info=info)

    def compute(self, model: nn.Module, batch: PairBatch) -> TaskOutput:
        out = model(images=batch.images, text_ids=batch.text_ids, padding_mask=batch.padding_mask)
        clip = self.criterion(out.image_embeds, out.text_embeds, out.logit_scale)
        return TaskOutput(
            clip.loss,
            {"image_to_text": clip.logits_per_image, "text_to_image": clip.logits_per_text},
            {"loss_contrastive": clip.loss.detach()},
        )

    def log_values(self, model: nn.Module) -> dict[str, float]:
        return {"logit_scale": float(model.logit_scale.detach().float().exp())}


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
