"""Recall@5 of vector, keyword and hybrid search on the bundled emoji demo (issue 13).

Indexes demo/data/emoji (captions.jsonl: each image labelled with its CLDR name) with the bundled
model demo/model into a temporary LanceDB through the real indexer, then runs the fixed query set
tests/fixtures/hybrid_queries.tsv. Its two halves:

- keyword: 20 exact CLDR names and 20 file names (codepoints, ``1f3f8``), where the words are
  in the row's search_text;
- vector: 40 aliases of train-split emoji (``cop``, ``sheep``) that share no word with the name
  or the file name; the model learned them, the keyword index cannot know them.

A query finds its image if the image is among the top 5. Hybrid (LanceDB's reciprocal rank
fusion) must be within 2 points of the better single mode on each half.

    python bench/hybrid_recall.py                      # ~2 min on 2 cores (indexing 3,788 images)
    python bench/hybrid_recall.py --rrf-k 10,60 --db /tmp/emoji-db   # reuse an index, sweep K
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERIES = REPO / "tests" / "fixtures" / "hybrid_queries.tsv"
CAPTIONS = REPO / "demo" / "data" / "emoji" / "captions.jsonl"
MODEL = REPO / "demo" / "model"
K = 5


def read_queries(path: Path = QUERIES) -> list[tuple[str, str, str]]:
    """(half, query, image path relative to the captions file) per non-comment line."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            half, query, image = line.split("\t")
            out.append((half, query, image))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="index directory (default: a temporary one)")
    parser.add_argument("--rrf-k", default="60", help="comma-separated RRF K values to try")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--candidates", default="0", help="comma-separated: rows of each ranking fused"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import indexer.search as search_module
    from indexer import Searcher, index_images

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "db"
        start = time.perf_counter()
        report = index_images([CAPTIONS], db, MODEL, device="cpu", num_workers=args.workers)
        print(f"index: {report} ({time.perf_counter() - start:.0f} s)")
        searcher = Searcher(db, device="cpu")
        queries = read_queries()
        root = CAPTIONS.parent
        settings = [
            (int(r), int(c)) for r in args.rrf_k.split(",") for c in args.candidates.split(",")
        ]
        for rrf_k, candidates in settings:
            search_module.RRF_K = rrf_k
            search_module.HYBRID_CANDIDATES = candidates
            found: dict[tuple[str, str], list[bool]] = {}
            start = time.perf_counter()
            for half, query, image in queries:
                want = str(root / image)
                for mode in ("vector", "keyword", "hybrid"):
                    hits = searcher.search(query, "images", k=K, mode=mode)
                    found.setdefault((half, mode), []).append(any(h.path == want for h in hits))
            elapsed = time.perf_counter() - start
            print(
                f"\nrecall@{K}, RRF K={rrf_k}, candidates max({K}, {candidates}) per ranking "
                f"({len(queries) * 3} queries in {elapsed:.1f} s)"
            )
            print(f"{'half':8s} {'n':>3s} {'vector':>7s} {'keyword':>8s} {'hybrid':>7s}  verdict")
            for half in ("keyword", "vector"):
                r = {
                    m: 100 * sum(found[(half, m)]) / len(found[(half, m)])
                    for m in ("vector", "keyword", "hybrid")
                }
                best = max(r["vector"], r["keyword"])
                verdict = "ok" if r["hybrid"] >= best - 2 else f"MISSED by {best - r['hybrid']:.1f}"
                print(
                    f"{half:8s} {len(found[(half, 'vector')]):3d} {r['vector']:6.1f}% "
                    f"{r['keyword']:7.1f}% {r['hybrid']:6.1f}%  {verdict}"
                )


if __name__ == "__main__":
    main()
