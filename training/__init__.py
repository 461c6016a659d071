"""Fine-tuning on anyone's image-text pairs and recall@k evaluation.

A run trains one task (:mod:`training.tasks`: ``contrastive``, the dual encoder); the loop,
wrapping, checkpoints and resume are the run kit's (:mod:`beit3.run`).

Public surface::

    from training import FinetuneConfig, finetune, EvalConfig, evaluate
    final = finetune(FinetuneConfig(train="pairs.jsonl", output_dir="runs/a", init="ckpt/base"))
    metrics = evaluate(EvalConfig(checkpoint=str(final), data="test.jsonl"))

Both run on one process or under ``torchrun`` (DDP; FSDP for large models).
"""

from training.config import EvalConfig, FinetuneConfig
from training.data import TrainData
from training.evaluate import evaluate, evaluate_model, format_table
from training.finetune import build_optimizer, finetune, forward_backward
from training.loss import ClipLoss, ContrastiveOutput
from training.metrics import RECALL_KS, average_recall, recall_at_k, retrieval_recall
from training.tasks import (
    ContrastiveTask,
    FinetuneTask,
    TaskOutput,
    get_task,
    list_tasks,
    register_task,
)

__all__ = [
    "RECALL_KS",
    "ClipLoss",
    "ContrastiveOutput",
    "ContrastiveTask",
    "EvalConfig",
    "FinetuneConfig",
    "FinetuneTask",
    "TaskOutput",
    "TrainData",
    "average_recall",
    "build_optimizer",
    "evaluate",
    "evaluate_model",
    "finetune",
    "format_table",
    "forward_backward",
    "get_task",
    "list_tasks",
    "recall_at_k",
    "register_task",
    "retrieval_recall",
]
