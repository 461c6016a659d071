"""Entry point for the multi-process tests: ``torchrun ... dist_run.py config.json``."""

import json
import sys

import torch

from beit3.pretrain.config import PretrainConfig
from beit3.pretrain.train import pretrain

if __name__ == "__main__":
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        pretrain(PretrainConfig.from_dict(json.load(f)))
