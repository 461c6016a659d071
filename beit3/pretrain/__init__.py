"""Masked data modeling pretraining (BEiT-3): one loss over texts, images and image-text pairs.

Public surface::

    from beit3.pretrain import PretrainConfig, VisualTokenizerConfig, pretrain, train_visual_tokenizer
    tok = train_visual_tokenizer(VisualTokenizerConfig(output_dir="vq", data=("pairs.jsonl",)))
    run = pretrain(PretrainConfig(output_dir="run", pair_data=("pairs.jsonl",),
                                  tokenizer="spm.model", visual_tokenizer=str(tok.path)))
    load_checkpoint(run.checkpoint, architecture="retrieval")   # fine-tuning starts here

The training entry points (``pretrain``, ``train_visual_tokenizer`` and their configs) are
imported lazily: :mod:`beit3.factory` imports the model from here, and the training modules import
:mod:`beit3.checkpoint`, which imports the factory.
"""

from __future__ import annotations

from typing import Any

from beit3.pretrain.loss import MaskedModelingLoss, MaskedStats, masked_cross_entropy
from beit3.pretrain.model import Beit3ForPretraining, PretrainingOutput
from beit3.pretrain.teachers import Beit3Teacher, PixelTeacher

__all__ = [
    "Beit3ForPretraining",
    "Beit3Teacher",
    "MaskedModelingLoss",
    "MaskedStats",
    "PixelTeacher",
    "PretrainConfig",
    "PretrainResult",
    "PretrainingOutput",
    "VisualTokenizerConfig",
    "load_pretrained",
    "masked_cross_entropy",
    "pretrain",
    "train_visual_tokenizer",
]

_LAZY = {
    "PretrainConfig": "beit3.pretrain.config",
    "VisualTokenizerConfig": "beit3.pretrain.config",
    "PretrainResult": "beit3.pretrain.train",
    "pretrain": "beit3.pretrain.train",
    "load_pretrained": "beit3.pretrain.train",
    "train_visual_tokenizer": "beit3.pretrain.visual_tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'beit3.pretrain' has no attribute {name!r}")
