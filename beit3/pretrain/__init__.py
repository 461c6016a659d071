"""Masked data modeling pretraining (BEiT-3): one loss over texts, images and image-text pairs.

Public surface::

    from beit3.pretrain import PretrainConfig, VisualTokenizerConfig, pretrain, train_visual_tokenizer
    tok = train_visual_tokenizer(VisualTokenizerConfig(output_dir="vq", data=("pairs.jsonl",)))
    run = pretrain(PretrainConfig(output_dir="run", pair_data=("pairs.jsonl",),
                                  tokenizer="spm.model", visual_tokenizer=str(tok.path)))
    load_checkpoint(run.checkpoint, architecture="retrieval")   # fine-tuning starts here

Importing this package registers the ``pretraining`` architecture with :mod:`beit3.factory`
(``beit3`` imports it, so a pretraining checkpoint always loads).
"""

from __future__ import annotations

from beit3.pretrain.config import PretrainConfig, VisualTokenizerConfig
from beit3.pretrain.loss import MaskedModelingLoss, MaskedStats, masked_cross_entropy
from beit3.pretrain.model import Beit3ForPretraining, PretrainingOutput
from beit3.pretrain.teachers import Beit3Teacher, PixelTeacher
from beit3.pretrain.train import PretrainResult, load_pretrained, pretrain
from beit3.pretrain.visual_tokenizer import train_visual_tokenizer

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
