"""Pretraining throughput: tokens/s, peak memory and model FLOPs utilisation (MFU).

Runs the real training step (``beit3.pretrain.train.train_step``: VQ-KD targets, one forward over
the text, image and pair batches, the masked-modeling loss, backward, clipping, AdamW) on
synthetic, device-resident batches, so data loading is not measured. FLOPs are counted by hand
from the shapes (``beit3.pretrain.flops``): MFU = model FLOPs of the step / step time / peak.
The VQ-KD forward is reported separately (it is work, but not model FLOPs).

    python bench/pretrain_speed.py                                   # CPU, beit3-tiny, fp32
    python bench/pretrain_speed.py --device cuda --preset beit3-base # bf16, H200 peaks
    python bench/pretrain_speed.py --device cuda --preset beit3-base --compile

On CUDA the batch per kind starts at --batch (default 128) and halves on out-of-memory.
Peaks: H200 bf16 dense 989 TFLOP/s (datasheet), ~790 TFLOP/s measured (matmul microbenchmark).
``--no-tokenizer`` replaces the VQ-KD forward by random targets (the model alone); with
``--compile`` use ``--drop-path 0`` for the quickest build (per-rate graphs otherwise; see
``beit3.pretrain.train.compile_layers``). ``--profile N`` then runs N more steps under
``torch.profiler`` and prints where the step's time goes: the operators by their own device time
(CPU time on the CPU), and how much of the wall-clock the device was busy.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit3.config import create_config  # noqa: E402
from beit3.pretrain.config import PretrainConfig  # noqa: E402
from beit3.pretrain.data import BatchMasker, max_masked  # noqa: E402
from beit3.pretrain.flops import StreamShape, step_flops, vqkd_encode_flops  # noqa: E402
from beit3.pretrain.loss import MaskedModelingLoss  # noqa: E402
from beit3.pretrain.masking import BlockMasking  # noqa: E402
from beit3.pretrain.model import Beit3ForPretraining  # noqa: E402
from beit3.pretrain.train import (  # noqa: E402
    StepModule,  # noqa: E402
    build_optimizer,
    compile_layers,
    train_step,
)
from beit3.pretrain.vqkd import VQKD, get_vqkd_preset  # noqa: E402

PEAKS_TFLOPS = {"datasheet": 989.0, "measured": 790.0}  # H200 SXM, bf16 dense
_RSS_AT_IMPORT = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _batches(cfg, args, vocab: int, seed: int) -> dict:
    """One synthetic masked batch per kind, made by the real collate function."""
    rng = np.random.default_rng(seed)
    grid = cfg.grid_size
    out = {}
    for kind, batch, length, text_ratio in (
        ("text", args.text_batch, args.text_len, 0.15),
        ("image", args.image_batch, 0, 0.0),
        ("pair", args.pair_batch, args.pair_len, 0.5),
    ):
        if batch == 0:
            continue
        masker = BatchMasker(
            kind,
            seed,
            mask_id=vocab - 1,
            text_ratio=text_ratio,
            image_masking=BlockMasking(grid, 0.4) if kind != "text" else None,
            pad_to=length or None,
            text_slots=max_masked(length, text_ratio) if length else None,
        )
        samples = []
        for i in range(batch):
            sample = {"key": (0, i)}
            if kind != "text":
                sample["image"] = torch.from_numpy(
                    rng.standard_normal((3, cfg.img_size, cfg.img_size), dtype=np.float32)
                )
            if kind != "image":
                # Texts fill 60-100% of the padded length (real captions vary).
                n = int(rng.integers(int(0.6 * length), length + 1))
                sample["text_ids"] = [0, *rng.integers(4, vocab - 2, n - 2).tolist(), 2]
            samples.append(sample)
        out[kind] = masker(samples)
    return out


def _shapes(batches: dict) -> dict[str, StreamShape]:
    return {
        kind: StreamShape(
            batch=b.index.shape[0],
            text_len=b.text_ids.shape[1] if b.text_ids is not None else 0,
            images=b.images is not None,
            text_slots=b.text_positions.shape[1] if b.text_positions is not None else 0,
            image_slots=b.image_positions.shape[1] if b.image_positions is not None else 0,
        )
        for kind, b in batches.items()
    }


def _run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = create_config(args.preset, use_checkpoint=args.use_checkpoint, attention=args.attention)
    vocab = cfg.vocab_size
    vq_cfg = get_vqkd_preset(args.vqkd, img_size=cfg.img_size, patch_size=cfg.patch_size)
    run = PretrainConfig(
        output_dir=tempfile.mkdtemp(),
        pair_data=("<synthetic>",),
        fused_optimizer=cuda and not args.no_fused,
        drop_path_rate=args.drop_path,
    )
    torch.manual_seed(0)
    model = (
        Beit3ForPretraining(
            cfg.replace(drop_path_rate=run.drop_path_rate), codebook_size=vq_cfg.codebook_size
        )
        .to(device)
        .train()
    )
    vqkd = None
    if not args.no_tokenizer:
        vqkd = VQKD(vq_cfg).to(device).eval()
        with torch.no_grad():
            vqkd.quantize.kmeans_init_(
                torch.randn(4 * vq_cfg.codebook_size, vq_cfg.codebook_dim, device=device), iters=2
            )
    optimizer = build_optimizer(model, run, device)
    if args.compile:
        compile_layers(model)
    forward = StepModule(model)
    loss_fn = MaskedModelingLoss()
    sets = [
        {k: b.to(device) for k, b in _batches(cfg, args, vocab, seed).items()} for seed in range(2)
    ]
    if vqkd is None:  # random targets stand in for the tokenizer's codes

        class _Codes:
            @staticmethod
            def encode(images):
                return torch.randint(
                    0,
                    vq_cfg.codebook_size,
                    (images.shape[0], cfg.num_patches),
                    device=images.device,
                )

        vqkd = _Codes()  # type: ignore[assignment]

    def step(i: int):
        return train_step(
            forward,
            model,
            optimizer,
            loss_fn,
            sets[i % 2],
            vqkd,
            bf16=cuda and not args.fp32,
            grad_clip=3.0,
        )

    start = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(args.steps):
        out = step(i)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    loss_ok = all(torch.isfinite(s.loss_sum).item() for s in out.stats.values())
    if args.profile:
        _profile(step, args.profile, cuda)

    batches = sets[0]
    shapes = _shapes(batches)
    flops = step_flops(cfg, shapes, vq_cfg.codebook_size, vocab)
    tok_flops = (
        vqkd_encode_flops(vq_cfg, sum(s.batch for s in shapes.values() if s.images))
        if not args.no_tokenizer
        else 0.0
    )
    tokens = sum(
        s.batch * (s.text_len + (cfg.num_vision_tokens if s.images else 0)) for s in shapes.values()
    )
    step_s = elapsed / args.steps
    model_tflops = sum(flops.values()) / step_s / 1e12
    result = {
        "preset": args.preset,
        "drop_path": args.drop_path,
        "device": torch.cuda.get_device_name()
        if cuda
        else f"CPU x{torch.get_num_threads()} threads",
        "precision": "bf16" if cuda and not args.fp32 else "fp32",
        "compile": args.compile,
        "use_checkpoint": args.use_checkpoint,
        "batch": {k: s.batch for k, s in shapes.items()},
        "text_len": args.text_len,
        "pair_len": args.pair_len,
        "steps": args.steps,
        "warmup_s": round(warmup_s, 1),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s),
        "samples_per_s": round(sum(s.batch for s in shapes.values()) / step_s, 1),
        "model_tflop_per_step": _sig(sum(flops.values()) / 1e12),
        "model_tflop_per_step_by_kind": {k: _sig(v / 1e12) for k, v in flops.items()},
        "tokenizer_tflop_per_step": _sig(tok_flops / 1e12),
        "model_tflops": _sig(model_tflops),
        "loss_finite": loss_ok,
    }
    if cuda:
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        for name, peak in PEAKS_TFLOPS.items():
            result[f"mfu_{name}"] = round(model_tflops / peak, 4)
            result[f"mfu_with_tokenizer_{name}"] = round(
                (sum(flops.values()) + tok_flops) / step_s / 1e12 / peak, 4
            )
    else:  # CPU tensors have no allocator statistics: the process's peak resident set
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result["peak_rss_over_imports_mib"] = round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _RSS_AT_IMPORT) / 1024
        )
        if args.peak_tflops:
            result["mfu"] = round(model_tflops / args.peak_tflops, 4)
    return result


def _profile(step, steps: int, cuda: bool, rows: int = 25) -> None:
    """``steps`` more steps under torch.profiler: the top operators by their own time on the
    device, and the share of the wall-clock in which a kernel ran (the rest is launch overhead,
    host work and synchronisation)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    if cuda:
        from torch.autograd import DeviceType

        busy = (  # the kernels' own rows (an operator's row repeats its kernels' time)
            sum(
                e.self_device_time_total
                for e in events
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation
            )
            / 1e6  # microseconds -> s
        )
        print(
            f"# profile: {steps} steps in {wall:.3f} s (profiler on), kernels "
            f"{busy:.3f} s = {busy / wall:.0%} of the wall-clock"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="default: beit3-tiny (CPU), beit3-base")
    parser.add_argument("--vqkd", default=None, help="default: vqkd-tiny (tiny), vqkd-base")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="per kind (default 32 on CPU, 128 on CUDA; halves on OOM)",
    )
    parser.add_argument("--text-batch", type=int, default=None)
    parser.add_argument("--image-batch", type=int, default=None)
    parser.add_argument("--pair-batch", type=int, default=None)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--pair-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile each encoder layer")
    parser.add_argument(
        "--drop-path",
        type=float,
        default=0.1,
        help="stochastic depth (paper 0.1; 0 makes --compile build 3 graphs)",
    )
    parser.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--no-fused", action="store_true", help="unfused AdamW on CUDA")
    parser.add_argument("--no-tokenizer", action="store_true", help="random visual targets")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="CPU peak, for an MFU")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument(
        "--profile", type=int, default=0, help="then N steps under torch.profiler (a table)"
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.preset = args.preset or ("beit3-base" if cuda else "beit3-tiny")
    args.vqkd = args.vqkd or ("vqkd-tiny" if args.preset == "beit3-tiny" else "vqkd-base")
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = args.batch or (128 if cuda else 32)
    if args.preset == "beit3-tiny":
        args.text_len, args.pair_len = min(args.text_len, 32), min(args.pair_len, 16)
    names = ("text_batch", "image_batch", "pair_batch")
    explicit = {name: getattr(args, name) for name in names}
    result = None
    while result is None:
        for name in names:
            setattr(args, name, batch if explicit[name] is None else explicit[name])
        try:
            result = _run(args)
        except torch.cuda.OutOfMemoryError:
            if batch <= 8:
                raise
            print(
                f"# out of memory at batch {batch} per kind; retrying with {batch // 2}", flush=True
            )
            batch //= 2
            explicit = {k: None if v is None else max(v // 2, 1) for k, v in explicit.items()}
        if result is None:
            gc.collect()
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))
    summary = (
        f"# {result['preset']} {result['precision']} on {result['device']}: "
        f"{result['tokens_per_s']:,} tokens/s, {result['step_s'] * 1e3:.0f} ms/step, "
        f"{result['model_tflops']} model TFLOP/s"
    )
    if cuda:
        summary += (
            f", MFU {result['mfu_datasheet']:.1%} of 989 / {result['mfu_measured']:.1%} "
            f"of 790 TFLOP/s, peak {result['peak_mem_gib']} GiB"
        )
    else:
        summary += (
            f", peak RSS {result['peak_rss_mib']} MiB "
            f"({result['peak_rss_over_imports_mib']} MiB over the imports)"
        )
    print(summary)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
