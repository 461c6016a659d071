"""Forward time and peak memory: our BEiT-3 vs the official implementation (torchscale 0.3.0).

Same weights in both, eval mode, no grad. Modes: image-only, text-only and image+text (joint).
Prints one row per mode with the time ratio (reference / ours; > 1 means ours is faster) and the
largest output difference.

    python bench/model_speed.py                      # CPU fp32, beit3-base, batch 8, 224 + 64 tokens
    python bench/model_speed.py --device cuda        # bf16 autocast on GPU
    python bench/model_speed.py --int8 only          # CPU: fp32 vs int8 encoders, same run
    python bench/model_speed.py --accuracy demo/model   # int8 vs fp32 on the demo data

On CPU a second table times ``encode_image`` / ``encode_text`` of ours in fp32 and with int8
dynamic quantisation (beit3.quantize), alternating the two so that load on the machine hits both
alike, and prints the ratio and the cosine of the int8 to the fp32 embeddings. ``--accuracy``
measures a trained checkpoint instead: mean cosine on the demo images and names, and the demo
recall (demo/measure_model.py) for fp32, int8, and the two mixed (int8 images with fp32 texts and
the reverse: whether an index may hold vectors of both).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit3 import create_config  # noqa: E402
from beit3.heads import Beit3ForRetrieval  # noqa: E402
from bench._memory import peak_since_reset, reset_peak  # noqa: E402
from tests.reference import build_reference  # noqa: E402


def _time(fn, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds per call and peak extra memory (MiB) of one call."""
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def _cpu_peak(impl: str, mode: str, args: argparse.Namespace, weights: Path) -> float:
    """Extra resident memory (MiB) of one forward on CPU, measured in a fresh process: CPU
    tensors have no allocator statistics and ru_maxrss is per process (and fork() after OpenMP
    has started deadlocks), so each (implementation, mode) gets its own interpreter."""
    cmd = [
        sys.executable,
        __file__,
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--text-len",
        str(args.text_len),
        "--threads",
        str(args.threads),
        "--child",
        f"{impl}:{mode}:{weights}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _build(
    args: argparse.Namespace, device: str, weights: Path | None = None, compile_ours: bool = False
):
    cfg = create_config(args.preset)
    with torch.device("meta"):
        ours = Beit3ForRetrieval(cfg)
    if weights is None:
        torch.manual_seed(0)
        ours = ours.to_empty(device="cpu")
        ours.beit3.init_weights()
        ours.init_heads()
        state = ours.state_dict()
    else:
        # Cloned, so the weights are resident before the forward is measured (a safetensors
        # load is memory-mapped: its pages would be counted as the forward's memory).
        state = {k: v.clone() for k, v in load_file(str(weights)).items()}
        ours.load_state_dict(state, assign=True)
    ref = build_reference(cfg, state)
    ours, ref = ours.to(device).eval(), ref.to(device).eval()
    b, length = args.batch, args.text_len
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, cfg.img_size, cfg.img_size, generator=gen).to(device)
    ids = torch.randint(4, 60000, (b, length), generator=gen).to(device)
    pad = torch.zeros(b, length, dtype=torch.bool, device=device)
    modes = {
        "image": (
            lambda: ours.beit3(images=images).hidden_states,
            lambda: ref.beit3(textual_tokens=None, visual_tokens=images)["encoder_out"],
        ),
        "text": (
            lambda: ours.beit3(text_ids=ids, padding_mask=pad).hidden_states,
            lambda: ref.beit3(textual_tokens=ids, visual_tokens=None, text_padding_position=pad)[
                "encoder_out"
            ],
        ),
        "image+text": (
            lambda: ours.beit3(images=images, text_ids=ids, padding_mask=pad).hidden_states,
            lambda: ref.beit3(textual_tokens=ids, visual_tokens=images, text_padding_position=pad)[
                "encoder_out"
            ],
        ),
        # The retrieval surface: L2-normalised embeddings (ours computes only the pooled token
        # in the last layer; the official code computes every token and then takes token 0).
        "encode_image": (lambda: ours.encode_image(images), lambda: ref.encode_image(images)),
        "encode_text": (lambda: ours.encode_text(ids, pad), lambda: ref.encode_text(ids, pad)),
    }
    if compile_ours:
        mode = "reduce-overhead" if device == "cuda" else "default"  # CUDA graphs on GPU
        backbone = torch.compile(ours.beit3, mode=mode)
        encode_image = torch.compile(ours.encode_image, mode=mode)
        modes = {
            "image": (lambda: backbone(images=images).hidden_states, modes["image"][1]),
            "encode_image": (lambda: encode_image(images), modes["encode_image"][1]),
        }
    return cfg, ours, modes


def _gflop(fn) -> float:
    """Floating-point operations of one call, in GFLOP, as FlopCounterMode counts them. Counted
    with the math attention backend: FlopCounterMode does not see the fused CPU attention
    kernel, and the count must not depend on which kernel runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _matmul_gflops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """What this device does on one large square fp32 matmul (GFLOP/s, same threads): the
    ceiling a GEMM-bound forward can approach."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    seconds, _ = _time(lambda: a @ b, device, repeats)
    return 2 * size**3 / seconds / 1e9


def _wrap(fn, device: str, dtype: torch.dtype | None):
    def call():
        with (
            torch.inference_mode(),
            torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            return fn()

    return call


def _int8_rows(ours: Beit3ForRetrieval, cfg, args: argparse.Namespace) -> None:
    """fp32 vs int8 encoders of ours, timed alternately in one run (CPU)."""
    from beit3.quantize import quantize_model

    start = time.perf_counter()
    int8 = quantize_model(ours, "int8")
    quantize_s = time.perf_counter() - start
    b, length = args.batch, args.text_len
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(b, 3, cfg.img_size, cfg.img_size, generator=gen)
    ids = torch.randint(4, cfg.vocab_size, (b, length), generator=gen)
    pad = torch.zeros(b, length, dtype=torch.bool)
    print(f"# int8: dynamic quantisation of every nn.Linear ({quantize_s:.1f} s), batch {b}")
    print(
        f"{'mode':13s} {'fp32 ms':>9s} {'int8 ms':>9s} {'int8 speedup':>13s} {'cosine':>8s} "
        f"{'per item fp32/int8 ms':>22s}"
    )
    for mode, call in (
        ("encode_image", lambda m: m.encode_image(images)),
        ("encode_text", lambda m: m.encode_text(ids, pad)),
    ):
        fp32_fn = _wrap(lambda call=call: call(ours), "cpu", None)
        int8_fn = _wrap(lambda call=call: call(int8), "cpu", None)
        fp32_fn(), int8_fn()  # warm-up
        t_fp32, t_int8 = [], []
        for _ in range(args.repeats):  # alternate: a load spike hits both
            t_fp32.append(_time(fp32_fn, "cpu", 1)[0])
            t_int8.append(_time(int8_fn, "cpu", 1)[0])
        a, q = statistics.median(t_fp32), statistics.median(t_int8)
        cosine = (fp32_fn() * int8_fn()).sum(-1).mean().item()
        print(
            f"{mode:13s} {a * 1e3:9.1f} {q * 1e3:9.1f} {a / q:12.2f}x {cosine:8.4f} "
            f"{a * 1e3 / b:11.1f}/{q * 1e3 / b:<10.1f}"
        )


def int8_accuracy(checkpoint: Path) -> dict:
    """int8 against fp32 on the demo data: cosines, and demo/measure_model.py's recall for fp32,
    int8 and the two mixtures (image vectors of one encoder, text vectors of the other)."""
    import json

    from beit3 import load_checkpoint
    from beit3.quantize import quantize_checkpoint
    from beit3.transforms import load_image_tensor
    from demo import measure_model

    fp32 = load_checkpoint(checkpoint)
    int8 = quantize_checkpoint(fp32, "int8")
    rows = [json.loads(x) for x in (measure_model.DATA / "captions.jsonl").read_text().splitlines()]
    paths = sorted({measure_model.DATA / r["image"] for r in rows})
    names = sorted({r["text"] for r in rows})
    images = torch.stack([load_image_tensor(p, fp32.preprocess) for p in paths])
    batch = fp32.tokenizer(names)
    cosines = {}
    with torch.inference_mode():
        for kind, fn in (
            ("images", lambda m: torch.cat([m.encode_image(x) for x in images.split(256)])),
            (
                "names",
                lambda m: torch.cat(
                    [
                        m.encode_text(i, p)
                        for i, p in zip(
                            batch.text_ids.split(256), batch.padding_mask.split(256), strict=True
                        )
                    ]
                ),
            ),
        ):
            cos = (fn(fp32.model) * fn(int8.model)).sum(-1)
            cosines[kind] = {
                "n": len(cos),
                "mean": round(cos.mean().item(), 5),
                "min": round(cos.min().item(), 5),
            }

    class _Mixed(torch.nn.Module):
        """Image vectors from one encoder, text vectors from another."""

        def __init__(self, image_model, text_model) -> None:
            super().__init__()
            self.image_model, self.text_model = image_model, text_model

        def encode_image(self, x):
            return self.image_model.encode_image(x)

        def encode_text(self, ids, mask):
            return self.text_model.encode_text(ids, mask)

    out: dict = {"checkpoint": str(checkpoint), "model_id": fp32.model_id, "cosine": cosines}
    variants = {
        "fp32": fp32,
        "int8": int8,
        "int8 images + fp32 texts": dataclasses.replace(fp32, model=_Mixed(int8.model, fp32.model)),
        "fp32 images + int8 texts": dataclasses.replace(fp32, model=_Mixed(fp32.model, int8.model)),
    }
    loader = measure_model.load_checkpoint
    try:
        for name, ckpt in variants.items():
            # measure() loads its checkpoint itself: hand it this variant instead.
            measure_model.load_checkpoint = lambda *_a, ckpt=ckpt, **_k: ckpt
            result = measure_model.measure(checkpoint)
            out[name] = {s: result["splits"][s] for s in ("train", "val", "test")}
            out[name]["common_names_top5"] = result["common_names"]["top5"]
    finally:
        measure_model.load_checkpoint = loader
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="beit3-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile ours (CUDA graphs on GPU); image modes only",
    )
    parser.add_argument(
        "--int8",
        default="on",
        choices=["on", "off", "only"],
        help="CPU: also time ours fp32 vs int8 (only: skip the reference comparison)",
    )
    parser.add_argument(
        "--accuracy",
        type=Path,
        default=None,
        metavar="CKPT",
        help="int8 vs fp32 cosines and demo recall of this checkpoint (e.g. demo/model)",
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accuracy is not None:
        import json

        torch.set_num_threads(args.threads or 2)
        print(json.dumps(int8_accuracy(args.accuracy), indent=1))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else None

    if args.child:
        impl, mode, weights = args.child.split(":", 2)
        _, _, modes = _build(args, "cpu", Path(weights))
        fn = _wrap(modes[mode][0 if impl == "ours" else 1], "cpu", None)
        gc.collect()
        before = reset_peak()
        fn()
        print(f"{peak_since_reset() - before:.1f}")
        return

    if device == "cpu" and args.int8 == "only":  # no reference model to build
        cfg = create_config(args.preset)
        torch.manual_seed(0)
        ours = Beit3ForRetrieval(cfg).eval()
    else:
        cfg, ours, modes = _build(args, device, compile_ours=args.compile)
    if device == "cpu" and args.int8 != "off":
        print(
            f"# {args.preset}, CPU x{torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"quantized engine {torch.backends.quantized.engine}"
        )
        _int8_rows(ours, cfg, args)
        if args.int8 == "only":
            return
    b, length = args.batch, args.text_len
    weights = None
    if device == "cpu":
        weights = Path(tempfile.mkdtemp()) / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(weights))
    precision = ("bf16 autocast" if dtype else "fp32") + (", ours compiled" if args.compile else "")
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(
        f"# {args.preset}, batch {b}, image {cfg.img_size} + {length} text tokens, {precision}, "
        f"{name}, torch {torch.__version__}"
    )
    if device == "cpu":
        print(f"# one 2048x2048 fp32 matmul here: {_matmul_gflops(device):.0f} GFLOP/s")
    print(
        f"{'mode':13s} {'ours ms':>9s} {'ref ms':>9s} {'speedup':>8s} "
        f"{'ours MiB':>9s} {'ref MiB':>9s} {'max |diff|':>11s} "
        f"{'GFLOP ours/ref':>15s} {'GFLOP/s ours/ref':>17s}"
    )
    total_ours = total_ref = 0.0
    for mode, (f_ours, f_ref) in modes.items():
        run_ours, run_ref = _wrap(f_ours, device, dtype), _wrap(f_ref, device, dtype)
        t_ours, m_ours = _time(run_ours, device, args.repeats)
        t_ref, m_ref = _time(run_ref, device, args.repeats)
        if weights is not None:
            m_ours = _cpu_peak("ours", mode, args, weights)
            m_ref = _cpu_peak("ref", mode, args, weights)
        diff = (run_ours().float() - run_ref().float()).abs().max().item()
        g_ours, g_ref = _gflop(run_ours), _gflop(run_ref)
        total_ours += t_ours
        total_ref += t_ref
        print(
            f"{mode:13s} {t_ours * 1e3:9.1f} {t_ref * 1e3:9.1f} {t_ref / t_ours:7.2f}x "
            f"{m_ours:9.0f} {m_ref:9.0f} {diff:11.2e} "
            f"{g_ours:7.1f}/{g_ref:<7.1f} {g_ours / t_ours:8.0f}/{g_ref / t_ref:<8.0f}"
        )
    print(
        f"{'all':13s} {total_ours * 1e3:9.1f} {total_ref * 1e3:9.1f} {total_ref / total_ours:7.2f}x"
    )


if __name__ == "__main__":
    main()
