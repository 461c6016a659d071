"""Entry point for the multi-process tests: ``torchrun ... dist_run.py config.json [vqkd]``."""

import json
import sys

import torch

from beit3.pretrain.config import PretrainConfig, VisualTokenizerConfig
from beit3.pretrain.train import pretrain
from beit3.pretrain.visual_tokenizer import train_visual_tokenizer

if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        fields = json.load(f)
    if sys.argv[2:] == ["vqkd"]:
        train_visual_tokenizer(VisualTokenizerConfig.from_dict(fields))
    else:
        pretrain(PretrainConfig.from_dict(fields))
