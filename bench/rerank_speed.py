"""What reranking with the fusion encoder costs a query: p50 / p99 latency for K = 8..64.

One process, one index per model, text queries against the image table, one query at a time
(an interactive search). The reference is the dual-encoder-only query (rerank 0) on the same
index, measured in the same run: every row prints its latency and the ratio to it, and the
time the reranking adds.

    python bench/rerank_speed.py                          # demo model + beit3-base (random)
    python bench/rerank_speed.py --models demo --ks 8,16,32,64 --queries 40
    python bench/rerank_speed.py --device cuda            # the GPU rows (bench/gpu_check.sh)
    python bench/rerank_speed.py --models demo --encoders fp32,int8   # the int8 encoder beside

``--encoders``: each model is indexed once per encoder (``int8``: ``index_images(quantize=
"int8")``, so the query, its vectors and the matcher all run through the dynamically quantised
model, as ``beit3 search`` does on such an index); every row's ratio is to the dual-encoder
query of the same encoder, measured just before it.

Models: ``demo`` is the bundled model (demo/model; without a trained matcher it gets a fresh
matcher head on its weights: the same computation) on 600 of the bundled emoji; ``base`` is ``beit3-base`` at 224 px with random weights
(architecture retrieval-itm) on 64 generated 224-px images: its speed, not its answers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from beit3 import create_model, load_checkpoint, save_checkpoint  # noqa: E402
from beit3.tokenizer import TextTokenizer  # noqa: E402
from indexer import Searcher, index_images  # noqa: E402

QUERIES = [
    "cat face", "red heart", "pizza", "thumbs up", "flag of Japan", "smiling face", "rocket",
    "dog", "sun", "snowman", "grapes", "car", "tree", "fire", "ghost", "moon", "star", "house",
    "banana", "guitar",
]  # fmt: skip


def _demo_index(
    work: Path, device: str, count: int, backend: str, quantize: str | None
) -> tuple[Path, str]:
    import json

    model = ROOT / "demo" / "model"
    ckpt = load_checkpoint(model, architecture="retrieval-itm")
    if ckpt.architecture != load_checkpoint(model).architecture:
        # The bundled model has no trained matcher: time it with a fresh matcher head on its
        # weights (the same computation; the answers are not what is measured here).
        model = work / "demo-itm"
        save_checkpoint(
            ckpt.model,
            model,
            preset=ckpt.preset,
            tokenizer=ckpt.tokenizer,
            preprocess=ckpt.preprocess,
        )
    rows = [json.loads(line) for line in (ROOT / "demo/data/emoji/captions.jsonl").open()]
    folder = work / "demo-images"
    folder.mkdir()
    for row in rows[:count]:
        (folder / Path(row["image"]).name).symlink_to(ROOT / "demo/data/emoji" / row["image"])
    db = work / "demo-db"
    index_images(
        [folder], db, model, num_workers=0, device=device, backend=backend, quantize=quantize
    )
    return db, load_checkpoint(model).model_id


def _base_index(
    work: Path, device: str, count: int, backend: str, quantize: str | None
) -> tuple[Path, str]:
    from PIL import Image

    spm = ROOT / "demo" / "model" / "tokenizer"
    tokenizer = TextTokenizer(spm)
    torch.manual_seed(0)
    model = create_model("beit3-base", "retrieval-itm", vocab_size=tokenizer.vocab_size)
    path = work / "base-itm"
    save_checkpoint(model, path, preset="beit3-base", tokenizer=tokenizer)
    folder = work / "base-images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(224, 224, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    db = work / "base-db"
    index_images(
        [folder], db, path, num_workers=0, device=device, backend=backend, quantize=quantize
    )
    return db, load_checkpoint(path).model_id


def _latencies(searcher: Searcher, rerank: int, queries: int) -> list[float]:
    times = []
    for i in range(queries + 2):
        query = QUERIES[i % len(QUERIES)]
        start = time.perf_counter()
        searcher.search(query, "images", k=10, rerank=rerank)
        if searcher.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up queries
            times.append((time.perf_counter() - start) * 1000)
    return times


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,base")
    parser.add_argument("--ks", default="8,16,32,64")
    parser.add_argument("--queries", type=int, default=30, help="per K (base: a third)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="lancedb", help="lancedb or faiss")
    parser.add_argument("--encoders", default="fp32", help="comma-separated: fp32, int8 (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    print(
        f"# rerank_speed: text query -> image table, k=10, device {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.backend}"
    )
    print(
        f"{'model':33s} {'rerank':>6s} {'p50 ms':>9s} {'p99 ms':>9s} {'x dual':>7s} {'+p50 ms':>8s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for encoder in args.encoders.split(","):
                _rows(name, encoder, Path(tmp) / f"{name}-{encoder}", ks, args)


def _rows(name: str, encoder: str, work: Path, ks: list[int], args: argparse.Namespace) -> None:
    work.mkdir()
    quantize = None if encoder == "fp32" else encoder
    start = time.perf_counter()
    if name == "demo":
        db, model_id = _demo_index(work, args.device, 600, args.backend, quantize)
        queries = args.queries
    elif name == "base":
        db, model_id = _base_index(work, args.device, 64, args.backend, quantize)
        queries = max(5, args.queries // 3)
    else:
        raise SystemExit(f"unknown model {name!r}: use demo or base")
    searcher = Searcher(db, device=args.device)
    built = time.perf_counter() - start
    dual = _latencies(searcher, 0, queries)
    p50 = statistics.median(dual)
    label = f"{name} {model_id}" + ("" if quantize is None else f" {encoder}")
    print(f"{label:33s} {0:6d} {p50:9.1f} {_p(dual, 99):9.1f} {1.0:7.2f} {0.0:8.1f}")
    for k in ks:
        times = _latencies(searcher, k, queries)
        k50 = statistics.median(times)
        print(
            f"{label:33s} {k:6d} {k50:9.1f} {_p(times, 99):9.1f} {k50 / p50:7.2f} {k50 - p50:8.1f}"
        )
    print(f"# {name} {encoder}: index built in {built:.1f} s; {queries} queries per row")


if __name__ == "__main__":
    main()
