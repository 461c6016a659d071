"""`beit3 finetune` on the peer domain at a wall-clock budget, then encoded for score.py.

    .venv/bin/python bench/peer/beit3_train_eval.py --variant init \
        --data .cache/peer-domain --out .cache/peer-runs/beit3-init --budget-min 20

Variants (the demo recipe's fine-tuning settings, demo/train_model.py):
  init      ``--init demo/model`` (the bundled model), lr 5e-4, layer decay 0.85
  scratch   the demo architecture (beit3-small narrowed: 6 layers of width 192, 48 px in 8 px
            patches) randomly initialised, with a sentencepiece model trained on the domain's
            train captions (the demo's 2,000 pieces, case-folded); lr 1e-3, layer decay 1,
            gradient norm clipped at 0.3 (the CLI's default from scratch; unclipped, the loss
            stayed at ln(128) for the whole 5-minute run: rsum 15.9 against 75.3). The
            CLI's ``--preset`` cannot narrow a preset, so this initial checkpoint is written
            first (its seconds are recorded as ``prep_s``, outside the budget) and passed as
            ``--init``, as demo/train_model.py --compare does.
  zeroshot  demo/model encoded as it is (no training; a floor for the table)
Both trained variants: batch 128, drop path 0.1, 1 data worker, the CLI's default augmentation,
warmup a fifth of the steps then cosine. ``beit3 finetune`` has no wall-clock option, so a
calibration run of ``--calibrate-steps`` steps (``metrics.jsonl`` times each step) sets
``--max-steps`` to land a little before the budget, and the run is stopped at the budget; the
model is ``final/`` when it finished, else the newest ``checkpoints/step-*`` (saved every tenth of
the planned steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _budget import (  # noqa: E402
    peer_env,
    plan_steps,
    read_jsonl,
    run_with_deadline,
    write_json,
)
from beit3_encode import encode  # noqa: E402

DEMO_MODEL = ROOT / "demo" / "model"
COMMON = {"batch_size": 128, "drop_path": 0.1, "num_workers": 1, "seed": 0}
VARIANTS = {
    "init": {"lr": 5e-4, "layer_decay": 0.85, "label": "beit3 finetune --init demo/model"},
    # --init of a random checkpoint, so the CLI's from-scratch default clip is passed explicitly.
    "scratch": {
        "lr": 1e-3,
        "layer_decay": 1.0,
        "grad_clip": 0.3,
        "label": "beit3 finetune, demo arch (scratch)",
    },
    "zeroshot": {"label": "beit3 demo/model, no training"},
}


def scratch_init(data: Path, path: Path, spm: Path | None = None) -> None:
    """A random demo-architecture checkpoint with the tokenizer ``spm``, by default one trained
    on the train captions."""
    import torch

    from beit3 import TextTokenizer, create_model, save_checkpoint, train_sentencepiece
    from beit3.transforms import PreprocessConfig
    from demo.train_model import MAX_TEXT_LEN, MODEL, PRESET, SPM_VOCAB

    if spm is None:
        texts = [row["text"] for row in read_jsonl(data / "train.jsonl")]
        spm = train_sentencepiece(texts, path.parent / "spm", vocab_size=SPM_VOCAB, lowercase=True)
    tokenizer = TextTokenizer(spm, max_len=MAX_TEXT_LEN)
    torch.manual_seed(0)
    model = create_model(PRESET, **{**MODEL, "vocab_size": tokenizer.vocab_size})
    save_checkpoint(
        model,
        path,
        preset=PRESET,
        tokenizer=tokenizer,
        preprocess=PreprocessConfig(img_size=MODEL["img_size"], max_text_len=MAX_TEXT_LEN),
    )


def finetune_command(
    data: Path,
    run_dir: Path,
    init: Path,
    variant: str,
    steps: int,
    save_every: int,
    log_every: int,
    extra: tuple[str, ...] = (),
) -> list[str]:
    settings = {**COMMON, **{k: v for k, v in VARIANTS[variant].items() if k != "label"}}
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "finetune",
        str(data / "train.jsonl"),
        "--output-dir",
        str(run_dir),
        "--init",
        str(init),
        "--max-steps",
        str(steps),
        "--save-every",
        str(save_every),
        "--log-every",
        str(log_every),
        "--no-tensorboard",
        "--device",
        "cpu",
        # The peer's augmentation (crop area 0.9-1, no flip): stamps hold letters and signs.
        "--crop-scale",
        "0.9",
        "1.0",
        "--hflip",
        "0",
    ]
    for key, value in settings.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command + list(extra)  # later options win (argparse): the variant's settings yield


def calibrate(
    data: Path, out: Path, init: Path, variant: str, steps: int, extra: tuple[str, ...] = ()
) -> dict:
    """Seconds per step (from metrics.jsonl, after the first two steps) and the fixed cost."""
    run_dir = out / "calibration"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = finetune_command(data, run_dir, init, variant, steps, 10_000, 1, extra)
    result = run_with_deadline(command, 900, out / "calibration.log", cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"error: beit3 calibration run failed; see {result.log}")
    elapsed = {
        r["step"]: r["elapsed_s"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if "elapsed_s" in r and "loss" in r
    }
    if len(elapsed) < 3:
        raise SystemExit(f"error: too few logged steps in {run_dir}/metrics.jsonl")
    first, last = sorted(elapsed)[1], max(elapsed)
    return {
        "calibration_wall_s": result.wall_s,
        "calibration_steps": steps,
        "step_s": (elapsed[last] - elapsed[first]) / (last - first),
        "calibration_command": command,
    }


def train(args: argparse.Namespace, data: Path, out: Path) -> tuple[dict, Path, int]:
    """Calibrate (unless --max-steps), train at the budget; (record, model dir, steps done)."""
    budget_s = 60.0 * args.budget_min
    record: dict = {}
    init = args.model
    if args.variant == "scratch":
        init = out / "scratch-init"
        started = time.monotonic()
        scratch_init(data, init, args.spm)
        record["prep_s"] = round(time.monotonic() - started, 1)
    plan: dict = {}
    if args.max_steps is None:
        plan = calibrate(data, out, init, args.variant, args.calibrate_steps, args.extra)
        plan |= plan_steps(
            budget_s, plan["calibration_wall_s"], plan["calibration_steps"], plan["step_s"]
        )
        steps = plan["steps"]
    else:
        steps = args.max_steps
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    save_every = max(1, steps // 10)
    command = finetune_command(data, run_dir, init, args.variant, steps, save_every, 10, args.extra)
    print(f"beit3 {args.variant}: {steps} steps, budget {budget_s:.0f} s")
    sys.stdout.flush()
    result = run_with_deadline(command, budget_s, out / "train.log", cwd=ROOT)
    record |= {"planned_steps": steps, "save_every": save_every, "train": result.to_dict()}
    record["plan"] = plan
    final = run_dir / "final"
    if result.returncode == 0 and (final / "config.json").is_file():
        return record, final, steps
    from beit3.run import find_latest

    latest = find_latest(run_dir)
    if latest is None:
        raise SystemExit(
            f"error: beit3 saved no step checkpoint within the budget; see {result.log}"
        )
    return record, latest, int(latest.name.split("-")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="output of build_domain.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-min", type=float, default=20.0)
    parser.add_argument(
        "--model",
        type=Path,
        default=DEMO_MODEL,
        help="init / zeroshot: this model instead of the bundled one (e.g. a recipe variant)",
    )
    parser.add_argument("--calibrate-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, help="skip calibration: train this many steps")
    parser.add_argument(
        "--spm", type=Path, help="scratch: this sentencepiece model instead of one of the captions"
    )
    parser.add_argument(
        "finetune_options",
        nargs="*",
        help="after --: more `beit3 finetune` options, overriding the variant's (e.g. -- --lr 1e-3)",
    )
    args = parser.parse_args()
    args.extra = tuple(args.finetune_options)
    data, out = args.data.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.variant == "zeroshot":
        record, model_dir, steps, minutes = {}, args.model.resolve(), 0, 0.0
    else:
        record, model_dir, steps = train(args, data, out)
        minutes = args.budget_min
    started = time.monotonic()
    npz = out / "beit3.npz"
    model_id = encode(model_dir, data / "test.jsonl", npz)
    meta = {
        "system": VARIANTS[args.variant]["label"].replace(
            "demo/model", str(args.model) if args.model != DEMO_MODEL else "demo/model"
        ),
        "minutes": minutes,
        "steps": steps,
        "model": str(model_dir),
        "model_id": model_id,
        "finetune_options": list(args.extra),
        "spm": str(args.spm) if args.spm else None,
        **record,
        "encode_s": round(time.monotonic() - started, 1),
        "env": {k: peer_env()[k] for k in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE")},
    }
    write_json(npz.with_suffix(".json"), meta)
    print(f"beit3 {args.variant}: {model_dir} ({steps} steps) -> {npz}")
    print(json.dumps({k: meta[k] for k in ("system", "minutes", "steps", "model_id")}))


if __name__ == "__main__":
    main()
