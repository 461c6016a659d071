"""Shared pieces of the pretraining tests: generated pairs, a trained tiny VQ-KD, small configs.

Plain functions, wrapped in fixtures by tests/beit3/pretrain/conftest.py and tests/app.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.data import write_shapes


def make_shapes_manifest(root: Path) -> Path:
    """128 generated pairs (32 colour x shape combinations, 4 jittered variants), 32 px."""
    rows = write_shapes(root / "images", size=32, variants=4)
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p), "text": c}) + "\n" for p, c in rows))
    return manifest


def train_tiny_vqkd(out: Path, shapes_manifest: Path) -> Path:
    """A vqkd-tiny tokenizer (32 codes) trained for 60 steps on the shapes, pixel teacher."""
    from beit3.pretrain.config import VisualTokenizerConfig
    from beit3.pretrain.visual_tokenizer import train_visual_tokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = train_visual_tokenizer(
        VisualTokenizerConfig(
            output_dir=str(out),
            data=(str(shapes_manifest),),
            preset="vqkd-tiny",
            overrides={"codebook_size": 32},
            batch_size=32,
            max_steps=60,
            lr=1e-3,
            warmup_steps=5,
            crop_scale=(0.6, 1.0),
            num_workers=0,
            log_every=20,
            reseed_every=20,
            tensorboard=False,
        )
    )
    torch.set_num_threads(before)
    return result.path


def tiny_config(output_dir: Path, spm: Path, manifest: Path, vqkd: Path | None, **overrides):
    """A beit3-tiny pretraining config on the shapes (text table cut to the tokenizer's ids)."""
    from beit3.pretrain.config import PretrainConfig
    from beit3.tokenizer import TextTokenizer

    vocab = TextTokenizer(spm).vocab_size
    base = {
        "output_dir": str(output_dir),
        "preset": "beit3-tiny",
        "model_overrides": {"vocab_size": vocab},
        "tokenizer": str(spm),
        "visual_tokenizer": str(vqkd) if vqkd else None,
        "pair_data": (str(manifest),),
        "text_batch_size": 16,
        "image_batch_size": 16,
        "pair_batch_size": 16,
        "max_steps": 2,
        "lr": 2e-3,
        "min_lr": 1e-4,
        "warmup_steps": 10,
        "drop_path_rate": 0.0,
        "crop_scale": (0.8, 1.0),
        "num_workers": 0,
        "log_every": 1,
        "save_every": 1000,
        "tensorboard": False,
    }
    base.update(overrides)
    return PretrainConfig(**base)


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
