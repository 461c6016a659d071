"""Fine-tuning throughput: pairs/s and peak memory of one retrieval fine-tuning step.

The step is the real one (``training.forward_backward`` + ``training.build_optimizer``): image and
text passes, the contrastive task's ClipLoss, backward, AdamW with the layer-decay groups, on synthetic device-resident
batches (data loading is not measured; captions fill 60-100% of --text-len). Several settings run
in the same invocation, so the printed ratios compare like with like:

    python bench/train_speed.py                                    # CPU, beit3-tiny, batch 32
    python bench/train_speed.py --device cuda --preset beit3-base  # batch 128 at 224

CPU: fp32 with and without activation checkpointing, each in a fresh process (peak resident
memory is per process). CUDA: fp32 (TF32 matmuls, the reference), bf16 autocast (the default of
``beit3 finetune``) and bf16 + activation checkpointing; peak = max allocated by the step. On
out-of-memory the batch halves.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Before torch starts OpenMP: busy-waiting threads on a shared, loaded CPU made a tiny step
# ~150x slower with 2 threads (1.7 s vs 11 ms); passive waiting costs nothing measurable here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit3 import create_model  # noqa: E402
from beit3.datasets import PairBatch  # noqa: E402
from beit3.run import DistInfo  # noqa: E402
from beit3.tokenizer import PAD_ID  # noqa: E402
from training import ContrastiveTask, FinetuneConfig, build_optimizer, forward_backward  # noqa: E402

_RSS_AT_IMPORT = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
SETTINGS = {
    "cpu": [("fp32", False), ("fp32+ckpt", False)],
    "cuda": [("fp32", False), ("bf16", True), ("bf16+ckpt", True)],
}


def _batch(
    n: int, img_size: int, text_len: int, vocab: int, seed: int, device: torch.device
) -> PairBatch:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.6 * text_len), text_len + 1, (n,), generator=gen)
    ids = torch.randint(4, vocab - 2, (n, text_len), generator=gen)
    ids[:, 0] = 0
    for row, length in enumerate(lengths.tolist()):
        ids[row, length - 1] = 2
        ids[row, length:] = PAD_ID
    images = torch.randn(n, 3, img_size, img_size, generator=gen)
    return PairBatch(
        images.to(device),
        ids.to(device),
        ids.eq(PAD_ID).to(device),
        torch.arange(n, device=device),
        torch.arange(n, device=device),
    )


def _measure(args: argparse.Namespace, name: str, use_bf16: bool) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:  # initialise on the device: a base model's init takes long on 2 CPU cores
        model = create_model(
            args.preset,
            img_size=args.img_size,
            drop_path_rate=0.2,
            use_checkpoint=name.endswith("ckpt"),
        ).train()
    model.beit3.vision_embed.mask_token.requires_grad_(False)
    run = FinetuneConfig(
        train="<synthetic>", output_dir="<none>", preset=args.preset, layer_decay=0.65
    )
    optimizer = build_optimizer(model, run, device)
    task = ContrastiveTask(DistInfo(0, 1, 0, device))
    vocab = model.config.vocab_size
    batches = [_batch(args.batch, args.img_size, args.text_len, vocab, s, device) for s in range(2)]

    def step(i: int) -> torch.Tensor:
        loss = forward_backward(model, task, batches[i % 2], device, use_bf16).loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    finite = bool(torch.isfinite(loss).item())  # also waits for the device
    step_s = (time.perf_counter() - start) / args.steps
    result = {
        "setting": name,
        "step_ms": round(step_s * 1e3, 2),
        "pairs_per_s": round(args.batch / step_s, 1),
        "loss_finite": finite,
    }
    if cuda:
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_rss_mib"] = round(peak / 1024)
        result["peak_rss_over_imports_mib"] = round((peak - _RSS_AT_IMPORT) / 1024)
    return result


def _cpu_child(args: argparse.Namespace, name: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--img-size",
        str(args.img_size),
        "--text-len",
        str(args.text_len),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--child",
        name,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, help="default: beit3-tiny (CPU), beit3-base")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (CPU), 128 (CUDA)")
    parser.add_argument("--img-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--text-len", type=int, default=None, help="default 16 (tiny), 40")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (CPU), 10 (CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    args.preset = args.preset or ("beit3-base" if cuda else "beit3-tiny")
    from beit3 import get_preset

    args.img_size = args.img_size or get_preset(args.preset).img_size
    args.batch = args.batch or (128 if cuda else 32)
    args.text_len = args.text_len or (16 if args.preset == "beit3-tiny" else 40)
    args.steps = args.steps or (10 if cuda else 20)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_measure(args, args.child, use_bf16=False)))
        return
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    began = time.perf_counter()
    results = []
    for name, use_bf16 in SETTINGS[args.device]:
        while True:
            try:
                results.append(
                    _cpu_child(args, name) if not cuda else _measure(args, name, use_bf16)
                )
                if cuda:  # the model and optimizer of that setting are garbage now
                    gc.collect()
                    torch.cuda.empty_cache()
                break
            except torch.cuda.OutOfMemoryError:
                if args.batch <= 8:
                    raise
                print(
                    f"# out of memory at batch {args.batch}; retrying with {args.batch // 2}",
                    flush=True,
                )
                args.batch //= 2
                results.clear()  # every setting at the same batch
                gc.collect()
                torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name() if cuda else f"CPU x{args.threads} threads"
    summary = {
        "preset": args.preset,
        "device": device,
        "batch": args.batch,
        "img_size": args.img_size,
        "text_len": args.text_len,
        "steps": args.steps,
        "results": results,
        "wall_s": round(time.perf_counter() - began, 1),
    }
    ref = results[0]
    mem = "peak_mem_gib" if cuda else "peak_rss_over_imports_mib"
    unit = "GiB" if cuda else "MiB"
    print(
        f"# {args.preset} fine-tuning step, batch {args.batch} pairs at {args.img_size}px, "
        f"{device}:"
    )
    for r in results:
        print(
            f"#   {r['setting']:10s} {r['pairs_per_s']:9.1f} pairs/s  {r['step_ms']:8.1f} ms/step"
            f"  peak {r[mem]} {unit}  speed x{r['pairs_per_s'] / ref['pairs_per_s']:.2f}"
            f"  memory x{r[mem] / max(ref[mem], 1e-9):.2f}  (vs {ref['setting']})"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
