"""Indexing throughput: images/s end to end (scan + hash + decode + preprocess + model + write)
against the model alone on preprocessed tensors, measured in the same run.

Writes N synthetic JPEG photos (noise + shapes, --photo-size px), builds a randomly initialised
checkpoint of --preset (or takes --checkpoint), then:
  model-only   encode_image on random (B, 3, S, S) batches (inference mode; bf16 autocast on CUDA)
  end-to-end   indexer.index_images into a fresh database (DataLoader workers decode)
  re-run       the same call again: nothing to embed (the incremental check)

    python bench/index_speed.py                                   # beit3-tiny, CPU, 2000 photos
    python bench/index_speed.py --device cuda --preset beit3-base --count 20000 --batch-size 256 \\
        --workers 8                                               # GPU run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit3 import create_model, get_preset, load_checkpoint, save_checkpoint  # noqa: E402
from beit3.run import autocast, resolve_device  # noqa: E402
from beit3.tokenizer import TextTokenizer, train_sentencepiece  # noqa: E402
from indexer import index_images  # noqa: E402


def write_photos(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` distinct JPEGs of size x (3/4 size): smooth noise plus a few filled shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h = size * 3 // 4
    base = rng.integers(0, 256, (h // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
    background = Image.fromarray(base).resize((size, h), Image.Resampling.BILINEAR)
    for i in range(count):
        img = background.copy()
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, size - 20)), int(rng.integers(0, h - 20))
            w = int(rng.integers(10, size // 2))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((x0, y0, x0 + w, y0 + w * 3 // 4), fill=color)
        draw.text((5, 5), str(i), fill=(255, 255, 255))
        img.save(folder / f"{i:06d}.jpg", quality=90)


def make_checkpoint(preset: str, directory: Path, device: torch.device) -> Path:
    """A randomly initialised checkpoint (initialised on ``device``: base's init takes minutes
    on 2 CPU cores)."""
    spm = train_sentencepiece(
        [f"word{i} thing{i % 7} photo" for i in range(500)], directory / "spm", vocab_size=200
    )
    torch.manual_seed(0)
    path = directory / "ckpt"
    with torch.device(device):
        model = create_model(preset)
    save_checkpoint(model, path, preset=preset, tokenizer=TextTokenizer(spm))
    return path


def model_only(ckpt_path: Path, device: torch.device, batch_size: int, batches: int) -> float:
    """Images/s of encode_image alone on (B, 3, S, S) tensors already on the device."""
    ckpt = load_checkpoint(ckpt_path, device=device)
    size = ckpt.preprocess.img_size
    images = torch.randn(batch_size, 3, size, size, device=device)  # already on the device
    times = []
    with torch.inference_mode(), autocast(device):  # the indexer's precision: bf16 on CUDA
        for step in range(batches + 2):
            start = time.perf_counter()
            ckpt.model.encode_image(images).float().cpu()  # .cpu() waits for the GPU
            if step >= 2:  # two warm-up batches
                times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="beit3-tiny")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a checkpoint directory (default: a random one of --preset)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--count", type=int, default=2000, help="photos to index")
    parser.add_argument("--photo-size", type=int, default=640, help="photo width in px")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="lancedb", choices=["lancedb", "faiss"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="index-bench-"))
    photos = workdir / "photos"
    start = time.perf_counter()
    if not photos.is_dir() or len(os.listdir(photos)) != args.count:
        shutil.rmtree(photos, ignore_errors=True)
        write_photos(photos, args.count, args.photo_size)
    ckpt = args.checkpoint or make_checkpoint(args.preset, workdir, device)
    preset = load_checkpoint(ckpt).preset if args.checkpoint else args.preset
    print(
        f"# index_speed: {preset} (img {get_preset(preset).img_size}px) on {device}, "
        f"{args.count} JPEGs of {args.photo_size}px, batch {args.batch_size}, "
        f"{args.workers} workers, {torch.get_num_threads()} torch threads, {os.cpu_count()} "
        f"cores, backend {args.backend}; setup {time.perf_counter() - start:.0f} s",
        flush=True,
    )

    model_rate = model_only(
        ckpt, device, args.batch_size, batches=max(3, min(20, args.count // args.batch_size))
    )
    print(f"model-only   {model_rate:9.1f} img/s", flush=True)

    db = workdir / "db"
    shutil.rmtree(db, ignore_errors=True)
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        marks.setdefault(f"{stage}-start", time.perf_counter())
        marks[f"{stage}-end"] = time.perf_counter()

    report = index_images(
        [photos],
        db,
        ckpt,
        backend=args.backend,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=str(device),
        progress=progress,
    )
    e2e_rate = report.indexed / report.elapsed_s
    embed_s = marks["embed-end"] - marks["embed-start"]
    print(
        f"end-to-end   {e2e_rate:9.1f} img/s  ({report.indexed} in {report.elapsed_s:.1f} s; "
        f"embed stage {report.indexed / embed_s:.1f} img/s; "
        f"x model-only {e2e_rate / model_rate:.2f})",
        flush=True,
    )
    again = index_images(
        [photos], db, backend=args.backend, num_workers=args.workers, device=str(device)
    )
    print(
        f"re-run       {again.seen / again.elapsed_s:9.1f} items/s checked "
        f"({again.unchanged} unchanged, {again.indexed} embedded, {again.elapsed_s:.2f} s)"
    )
    print(f"# {report}")


if __name__ == "__main__":
    main()
