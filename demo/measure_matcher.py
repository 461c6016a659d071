"""Does the bundled model's match probability separate answers from nonsense on the demo index?

    python demo/measure_matcher.py [--rerank 32] [--cutoff 0.5] [--model DIR]

Builds the demo index of all 3,788 bundled emoji with the bundled model (demo/model; or
``--model``, e.g. the itm stage of ``demo/train_model.py --itm``), as ``make demo`` does, then,
with the top
``--rerank`` vector hits re-scored by the fusion encoder:
- the no-answer queries of tests/fixtures/no_answer_queries.txt: how many return no hit at or
  above the cutoff (the app then says "no confident match");
- the test-split names (emoji never seen in training): of those whose emoji the dual encoder
  puts in its top ``--rerank``, how many keep it at or above the cutoff after reranking;
- the p50 time a reranked text query takes, beside the same query without reranking.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.demo import DEMO_CAPTIONS, build_demo_index  # noqa: E402
from app.screenshot import index_demo_with  # noqa: E402
from indexer import Searcher  # noqa: E402

NO_ANSWER = ROOT / "tests" / "fixtures" / "no_answer_queries.txt"


def no_answer_queries() -> list[str]:
    lines = NO_ANSWER.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def measure(searcher: Searcher, rerank: int, cutoff: float, names: list[tuple[str, str]]) -> dict:
    """``names``: (query, the caption of the emoji that answers it)."""
    nonsense = no_answer_queries()
    confident = [
        q for q in nonsense if searcher.search(q, "images", k=1, rerank=rerank, min_match=cutoff)
    ]
    in_top, kept = 0, 0
    for query, answer in names:
        hits = searcher.search(query, "images", k=rerank, rerank=rerank)
        hit = next((h for h in hits if h.text == answer), None)
        if hit is None:
            continue
        in_top += 1
        kept += hit.match is not None and hit.match >= cutoff
    times = {0: [], rerank: []}
    for query, _ in names[:30]:
        for k in times:
            start = time.perf_counter()
            searcher.search(query, "images", k=10, rerank=k)
            times[k].append((time.perf_counter() - start) * 1000)
    return {
        "rerank": rerank,
        "cutoff": cutoff,
        "no_answer_queries": len(nonsense),
        "no_answer_without_confident_hit": len(nonsense) - len(confident),
        "no_answer_fraction": (len(nonsense) - len(confident)) / len(nonsense),
        "no_answer_with_a_confident_hit": confident,
        "test_names": len(names),
        "test_names_in_dual_top": in_top,
        "test_names_kept_above_cutoff": kept,
        "kept_fraction": kept / max(in_top, 1),
        "p50_ms_dual": statistics.median(times[0]),
        "p50_ms_reranked": statistics.median(times[rerank]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerank", type=int, default=32)
    parser.add_argument("--cutoff", type=float, default=0.5)
    parser.add_argument("--db", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    args = parser.parse_args()
    rows = [json.loads(line) for line in DEMO_CAPTIONS.read_text().splitlines() if line]
    names = [(r["text"], r["text"]) for r in rows if r["split"] == "test"]
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "db"
        if args.model is None:
            build_demo_index(db, device="cpu", num_workers=0)
        else:
            index_demo_with(args.model, db)
        searcher = Searcher(db, device="cpu")
        result = {
            "model_id": searcher.model_id,
            **measure(searcher, args.rerank, args.cutoff, names),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
