"""open_clip from scratch on the peer domain, with open_clip's own trainer, at a wall-clock budget.

    .cache/peer-venv/bin/python bench/peer/openclip_train_eval.py \
        --data .cache/peer-domain --out .cache/peer-runs/openclip --budget-min 20

Run with the peer venv's python (open_clip_torch[training] 3.3.0; never the project's venv). It
1. registers a small ViT (64 px, patch 8, 4 vision + 4 text layers of width 128, embed 128) with
   ``open_clip.add_model_config`` and starts ``open_clip_train.main`` unmodified in a child process
   (``runpy``, with its own CLI: csv data, batch 128, 1 worker, fp32, its default AdamW for a ViT:
   lr 5e-4, betas (0.9, 0.98), eps 1e-6, wd 0.2, cosine schedule);
2. calibrates: a run of ``--calibrate-epochs`` epochs gives the seconds per step (the trainer's
   own "Batch (t)" log) and the fixed cost, from which the number of epochs that fits the budget
   follows; warmup is ``--warmup-fraction`` of the steps (open_clip's default of 10,000 warmup
   steps is longer than the whole run; 0.2 is ``beit3 finetune``'s default);
3. trains that many epochs with a hard stop at the budget, saving ``epoch_latest.pt`` after every
   epoch, and takes the newest checkpoint;
4. encodes the test images and the distinct test captions and writes ``openclip.npz`` and
   ``openclip.json`` (system, minutes, steps) for ``score.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _budget import peer_env, plan_steps, run_with_deadline, test_pairs, write_json  # noqa: E402

MODEL_NAME = "ViT-peer-64-8"  # "vit" in the name: open_clip_train picks its ViT AdamW defaults
MODEL_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
BATCH_SIZE = 128
WORKERS = 1
# Starts open_clip's trainer unmodified, after registering the config in the same process.
LAUNCHER = (
    "import runpy, sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "sys.argv = ['open_clip_train.main', *sys.argv[2:]]; "
    "runpy.run_module('open_clip_train.main', run_name='__main__', alter_sys=True)"
)
_BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")


def _count_rows(csv_path: Path) -> int:
    with csv_path.open(encoding="utf-8", newline="") as f:
        return sum(1 for _ in csv.reader(f, delimiter="\t")) - 1


def train_command(
    config_path: Path, data: Path, logs: Path, name: str, epochs: int, warmup: int, log_every: int
) -> list[str]:
    return [
        sys.executable,
        "-c",
        LAUNCHER,
        str(config_path),
        "--model",
        MODEL_NAME,
        "--train-data",
        str(data / "train.csv"),
        "--dataset-type",
        "csv",
        "--csv-separator",
        "\t",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--batch-size",
        str(BATCH_SIZE),
        "--workers",
        str(WORKERS),
        "--epochs",
        str(epochs),
        "--warmup",
        str(warmup),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--seed",
        "0",
        "--save-frequency",
        "0",  # only the last epoch as epoch_N.pt ...
        "--save-most-recent",  # ... and epoch_latest.pt after every epoch (written atomically)
        "--log-every-n-steps",
        str(log_every),
        "--report-to",
        "",
        "--logs",
        str(logs),
        "--name",
        name,
    ]


def _batch_times(log: Path) -> list[float]:
    return [float(m.group(1)) for m in _BATCH_TIME.finditer(log.read_text(errors="replace"))]


def calibrate(config_path: Path, data: Path, out: Path, epochs: int, steps_per_epoch: int) -> dict:
    """Seconds per step and the fixed cost, from a short run of the same command."""
    logs = out / "calibration"
    shutil.rmtree(logs, ignore_errors=True)
    steps = epochs * steps_per_epoch
    command = train_command(config_path, data, logs, "run", epochs, max(1, steps // 5), 1)
    result = run_with_deadline(command, 900, out / "calibration.log")
    if result.returncode != 0:
        raise SystemExit(f"error: open_clip calibration run failed; see {result.log}")
    # "Batch (t)" with --log-every-n-steps 1 is each step's time; the first includes warm-up.
    times = _batch_times(logs / "run" / "out.log")[1:]
    if not times:
        raise SystemExit(f"error: no 'Batch (t)' lines in {logs}/run/out.log")
    return {
        "calibration_wall_s": result.wall_s,
        "calibration_steps": steps,
        "step_s": sum(times) / len(times),
        "calibration_command": command,
    }


def latest_checkpoint(checkpoints: Path) -> Path | None:
    finals = sorted(checkpoints.glob("epoch_[0-9]*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    latest = checkpoints / "epoch_latest.pt"
    candidates = [p for p in (*finals, latest) if p.is_file()]
    if not candidates:
        return None
    import torch

    return max(candidates, key=lambda p: torch.load(p, map_location="cpu")["epoch"])


def encode(checkpoint: Path, config_path: Path, data: Path, npz_path: Path) -> int:
    """Test images and distinct captions -> ``npz_path``; returns the checkpoint's epoch."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    torch.set_num_threads(2)
    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
    state = torch.load(checkpoint, map_location="cpu")
    model.load_state_dict(state["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    with (data / "test.csv").open(encoding="utf-8", newline="") as f:
        rows = [
            {"image": r["filepath"], "text": r["title"]} for r in csv.DictReader(f, delimiter="\t")
        ]
    images, texts, pairs = test_pairs(rows)
    image_chunks, text_chunks = [], []
    with torch.no_grad():
        for i in range(0, len(images), 128):
            batch = torch.stack(
                [preprocess(Image.open(p).convert("RGB")) for p in images[i : i + 128]]
            )
            image_chunks.append(model.encode_image(batch, normalize=True).float())
        for i in range(0, len(texts), 128):
            tokens = tokenizer(texts[i : i + 128])
            text_chunks.append(model.encode_text(tokens, normalize=True).float())
    np.savez(
        npz_path,
        image_embeds=torch.cat(image_chunks).numpy(),
        text_embeds=torch.cat(text_chunks).numpy(),
        pairs=np.array(pairs, dtype=np.int64),
        images=np.array(images),
        texts=np.array(texts),
    )
    return int(state["epoch"])


def train(args: argparse.Namespace, config_path: Path, data: Path, out: Path) -> dict:
    """Calibrate (unless --epochs), then train at the budget; the run's record."""
    steps_per_epoch = _count_rows(data / "train.csv") // BATCH_SIZE  # drop_last=True
    if steps_per_epoch < 1:
        raise SystemExit(f"error: {data}/train.csv has fewer than {BATCH_SIZE} rows")
    budget_s = 60.0 * args.budget_min
    plan: dict = {}
    if args.epochs is None:
        plan = calibrate(config_path, data, out, args.calibrate_epochs, steps_per_epoch)
        plan |= plan_steps(
            budget_s, plan["calibration_wall_s"], plan["calibration_steps"], plan["step_s"]
        )
        epochs = max(1, plan["steps"] // steps_per_epoch)
    else:
        epochs = args.epochs
    warmup = round(args.warmup_fraction * epochs * steps_per_epoch)
    logs = out / "train"
    shutil.rmtree(logs, ignore_errors=True)
    command = train_command(config_path, data, logs, "run", epochs, warmup, 10)
    print(f"open_clip: {epochs} epochs x {steps_per_epoch} steps, budget {budget_s:.0f} s")
    sys.stdout.flush()
    result = run_with_deadline(command, budget_s, out / "train.log")
    return {
        "steps_per_epoch": steps_per_epoch,
        "planned_epochs": epochs,
        "warmup_steps": warmup,
        "train": result.to_dict(),
        "plan": plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="output of build_domain.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-min", type=float, default=20.0)
    parser.add_argument("--calibrate-epochs", type=int, default=2)
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, help="skip calibration: train this many epochs")
    parser.add_argument(
        "--encode-only", action="store_true", help="no training: encode the newest checkpoint"
    )
    args = parser.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    meta_path = out / "openclip.json"
    record_path = out / "train.json"
    if args.encode_only:
        record = json.loads(record_path.read_text())
    else:
        record = train(args, config_path, data, out)
        write_json(record_path, record)
    checkpoint = latest_checkpoint(out / "train" / "run" / "checkpoints")
    if checkpoint is None:
        raise SystemExit(
            f"error: open_clip saved no checkpoint within the budget; see {out}/train.log"
        )
    started = time.monotonic()
    epoch = encode(checkpoint, config_path, data, out / "openclip.npz")
    meta = {
        "system": "open_clip ViT 64/8 4+4x128 (scratch)",
        "minutes": args.budget_min,
        "steps": epoch * record["steps_per_epoch"],
        "epochs": epoch,
        "checkpoint": str(checkpoint),
        **record,
        "encode_s": round(time.monotonic() - started, 1),
        "env": {k: peer_env()[k] for k in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE")},
    }
    write_json(meta_path, meta)
    print(f"open_clip: epoch {epoch} ({meta['steps']} steps) -> {out / 'openclip.npz'}")


if __name__ == "__main__":
    main()
