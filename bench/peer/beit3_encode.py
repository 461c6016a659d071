"""Encode a manifest's images and distinct captions with a beit3 checkpoint, for score.py.

    .venv/bin/python bench/peer/beit3_encode.py CHECKPOINT_DIR .cache/peer-domain/test.jsonl OUT.npz

The path ``beit3 eval`` takes (training/evaluate.py): ``load_checkpoint(dir,
architecture="retrieval")``, images decoded and preprocessed by ``beit3.datasets.ImageFiles`` with the
checkpoint's ``preprocess.json`` (eval transform), captions by the checkpoint's tokenizer, then
``encode_image`` / ``encode_text`` (L2-normalised float32). Each distinct caption is encoded
once; the ground truth goes in ``pairs``. An unreadable image is an error here: the benchmark's
test set must be scored whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _budget import read_jsonl, test_pairs  # noqa: E402

from beit3 import load_checkpoint  # noqa: E402
from beit3.datasets import ImageFiles  # noqa: E402

BATCH_SIZE = 128


@torch.no_grad()
def encode(checkpoint: Path, manifest: Path, npz_path: Path) -> str:
    """Write ``npz_path`` (image_embeds, text_embeds, pairs, images, texts); returns the model id."""
    torch.set_num_threads(2)
    ckpt = load_checkpoint(checkpoint, architecture="retrieval")
    model = ckpt.model.eval()
    rows = read_jsonl(manifest)
    images, texts, pairs = test_pairs(rows)
    paths = [str((manifest.parent / p).resolve()) for p in images]
    loader = DataLoader(
        ImageFiles(paths, ckpt.preprocess),
        batch_size=BATCH_SIZE,
        num_workers=0,
        collate_fn=ImageFiles.collate,
    )
    image_chunks = []
    for batch in loader:
        if batch.failures:
            position, reason = batch.failures[0]
            raise SystemExit(f"error: {paths[position]}: {reason}")
        image_chunks.append(model.encode_image(batch.images).float())
    text_chunks = []
    for i in range(0, len(texts), BATCH_SIZE):
        tokens = ckpt.tokenizer(texts[i : i + BATCH_SIZE])
        text_chunks.append(model.encode_text(tokens.text_ids, tokens.padding_mask).float())
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        npz_path,
        image_embeds=torch.cat(image_chunks).numpy(),  # (N_img, D)
        text_embeds=torch.cat(text_chunks).numpy(),  # (M, D), M distinct captions
        pairs=np.array(pairs, dtype=np.int64),  # (N_img, 2)
        images=np.array(images),
        texts=np.array(texts),
    )
    return ckpt.model_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory")
    parser.add_argument("manifest", type=Path, help="test.jsonl of build_domain.py")
    parser.add_argument("out", type=Path, help="the .npz to write")
    args = parser.parse_args()
    model_id = encode(args.checkpoint, args.manifest, args.out)
    print(f"{model_id}: wrote {args.out}")


if __name__ == "__main__":
    main()
