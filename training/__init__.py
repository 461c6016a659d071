"""Retrieval fine-tuning and recall@k evaluation of the BEiT-3 dual encoder on anyone's pairs.

Public surface::

    from training import FinetuneConfig, finetune, EvalConfig, evaluate
    final = finetune(FinetuneConfig(train="pairs.jsonl", output_dir="runs/a", init="ckpt/base"))
    metrics = evaluate(EvalConfig(checkpoint=str(final), data="test.jsonl"))

Both run on one process or under ``torchrun`` (DDP; FSDP for large models).
"""

from training.config import EvalConfig, FinetuneConfig
from training.data import TrainData, is_shard_source
from training.evaluate import evaluate, evaluate_model, format_table
from training.finetune import build_optimizer, finetune, forward_backward
from training.loss import ClipLoss
from training.metrics import RECALL_KS, average_recall, recall_at_k, retrieval_recall

__all__ = [
    "RECALL_KS",
    "ClipLoss",
    "EvalConfig",
    "FinetuneConfig",
    "TrainData",
    "average_recall",
    "build_optimizer",
    "evaluate",
    "evaluate_model",
    "finetune",
    "format_table",
    "forward_backward",
    "is_shard_source",
    "recall_at_k",
    "retrieval_recall",
]
