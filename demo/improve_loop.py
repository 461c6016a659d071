"""The feedback loop, scripted on the demo data: 10 wrong queries, 3 labels each, one improve run.

    python demo/improve_loop.py [--cache DIR] [--run NAME] [--steps 30]    # JSON on stdout

1. the demo images indexed with the bundled model (demo/model) once into ``CACHE/base/db``
   (reused); each run works on a copy of that database in ``CACHE/NAME/db`` (the same depth:
   a database records its checkpoint relative to itself);
2. 10 text queries that the bundled model gets wrong (the right emoji ranks > 5 among all
   indexed images), taken from the val split's names (never the test split: that is the gate),
   in a seeded order;
3. 3 labels each, as the app stores them (indexer.feedback): the right image relevant, the two
   best wrong hits not relevant (hits that are test-split images are passed over: the gate's
   images stay out of training);
4. one ``app.improve`` run: fine-tune on those labels with the train split's pairs mixed in,
   held-out = the test split, index the new version from the bundled captions, activate;
5. printed: the mean rank of the marked relevant images before and after, held-out test mean
   recall before and after, the wall time of each stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see shared/reference/environment.md

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.demo import DEMO_CAPTIONS, DEMO_MODEL  # noqa: E402
from app.improve import ImproveConfig, improve  # noqa: E402
from indexer import Searcher, index_images  # noqa: E402
from indexer.feedback import FeedbackStore  # noqa: E402

DATA = DEMO_CAPTIONS.parent
QUERIES = 10
WRONG_RANK = 5  # a query is "wrong" when its right image ranks below this


def _split_manifest(rows: list[dict], split: str, path: Path) -> Path:
    path.write_text(
        "".join(
            json.dumps({"image": str(DATA / r["image"]), "text": r["text"]}) + "\n"
            for r in rows
            if r["split"] == split
        )
    )
    return path


def _ranks(searcher: Searcher, queries: list[tuple[str, str]]) -> list[int]:
    """Rank (1-based, among every image of the table) of each query's right image file."""
    total = searcher.tables["images"].count
    ranks = []
    for text, image in queries:
        hits = searcher.search(text, table="images", k=total)
        ranks.append(next(h.rank for h in hits if image in h.paths))
    return ranks


def _pairs(chosen: list[tuple[str, str]], negatives: list[list[str]]) -> list[tuple[str, str]]:
    """(query, image) for each image marked not relevant for a query."""
    return [
        (text, path) for (text, _), paths in zip(chosen, negatives, strict=True) for path in paths
    ]


def run(cache: Path, name: str, steps: int, seed: int) -> dict:
    started = time.monotonic()
    base, work = cache / "base" / "db", cache / name
    if not (base / "beit3_index.json").is_file():
        logging.info("building the demo index once into %s", base)
        index_images([DEMO_CAPTIONS], base, model=DEMO_MODEL, table="images", num_workers=0)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    db = work / "db"
    shutil.copytree(base, db)
    rows = [json.loads(line) for line in DEMO_CAPTIONS.read_text().splitlines()]
    test = _split_manifest(rows, "test", work / "test.jsonl")
    train = _split_manifest(rows, "train", work / "train.jsonl")

    searcher = Searcher(db, device="cpu")
    table = searcher.tables["images"]
    candidates = [(r["text"], str(DATA / r["image"])) for r in rows if r["split"] == "val"]
    held_out = {str(DATA / r["image"]) for r in rows if r["split"] == "test"}
    random.Random(seed).shuffle(candidates)
    chosen: list[tuple[str, str]] = []
    labels: list[dict] = []
    negatives: list[list[str]] = []
    store = FeedbackStore(db)
    for text, image in candidates:
        hits = searcher.search(text, table="images", k=WRONG_RANK)
        if any(image in h.paths for h in hits):
            continue  # the model gets it right
        ranking = searcher.search(text, table="images", k=table.count)
        right = next(h for h in ranking if image in h.paths)
        wrong = [h for h in ranking if not held_out & set(h.paths)][:2]
        negatives.append([w.paths[0] for w in wrong])
        for hit, label in [(right, 1), *((w, -1) for w in wrong)]:
            store.add(
                query_text=text,
                hit_table="images",
                hit_id=hit.id,
                hit_path=hit.path,
                label=label,
                model_id=table.model_id,
                version=table.version,
            )
        labels.append(
            {
                "query": text,
                "relevant": right.path,
                "rank": right.rank,
                "not_relevant": [w.path for w in wrong],
                "not_relevant_ranks": [w.rank for w in wrong],
            }
        )
        chosen.append((text, image))
        if len(chosen) == QUERIES:
            break
    before_ranks = _ranks(searcher, chosen)
    before_neg = _ranks(searcher, _pairs(chosen, negatives))
    prepared = time.monotonic() - started

    report = improve(
        ImproveConfig(
            db=str(db),
            output_dir=str(work / "run"),
            held_out=str(test),
            train=str(train),
            sources=(str(DEMO_CAPTIONS),),  # the same files, with their names as labels
            steps=steps,
            device="cpu",
            seed=seed,
        )
    )
    after = Searcher(db, device="cpu")
    after_ranks = _ranks(after, chosen)
    after_neg = _ranks(after, _pairs(chosen, negatives))
    return {
        "queries": [
            {**label, "rank_after": rank} for label, rank in zip(labels, after_ranks, strict=True)
        ],
        "labels": store.count(),
        "mean_rank_before": sum(before_ranks) / len(before_ranks),
        "mean_rank_after": sum(after_ranks) / len(after_ranks),
        "mean_rank_not_relevant_before": sum(before_neg) / len(before_neg),
        "mean_rank_not_relevant_after": sum(after_neg) / len(after_neg),
        "test_mean_recall_before": report.before,
        "test_mean_recall_after": report.after,
        "test_recall_before": report.before_metrics,
        "test_recall_after": report.after_metrics,
        "versions": {
            "before": f"{report.base_version} {report.base_model_id}",
            "after": f"{report.version} {report.model_id}",
            "active": f"{after.tables['images'].version} {after.tables['images'].model_id}",
        },
        "train_rows": report.train_rows,
        "stage_seconds": {"prepare (copy db, pick queries, label)": round(prepared, 1)}
        | {k: round(v, 1) for k, v in report.stages.items()},
        "stages_done_before": report.skipped,
        "total_seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    parser.add_argument("--cache", type=Path, default=cache_home / "beit3-search" / "improve-loop")
    parser.add_argument("--run", default="run", help="the run's folder under CACHE")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(2)
    if args.run in ("", "base", ".", "..") or "/" in args.run:
        parser.error(f"--run {args.run!r}: give a folder name other than 'base'")
    result = run(args.cache, args.run, args.steps, args.seed)
    print(json.dumps(result, indent=2))
    print(
        f"mean rank of the marked images {result['mean_rank_before']:.1f} -> "
        f"{result['mean_rank_after']:.1f} (not relevant: "
        f"{result['mean_rank_not_relevant_before']:.1f} -> "
        f"{result['mean_rank_not_relevant_after']:.1f}); test mean recall {result['test_mean_recall_before']:.1f}"
        f" -> {result['test_mean_recall_after']:.1f}; stages (s): "
        + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items()),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
