"""How much feedback and collapse help, and what steering costs, on the bundled emoji demo (issue 13).

Indexes demo/data/emoji with demo/model through the real indexer (or reuses --db), then measures
in one run:

1. **Rocchio feedback** (indexer.query.rocchio) for word queries whose relevant set is every emoji
   whose CLDR name has that word ("cat" -> cat, cat face, grinning cat...; 30 words that name 8 to
   60 emoji, skin-tone words left out). A simulated user marks, in rank order among the top 10,
   up to 3 relevant hits (thumbs up) and up to 3 others (thumbs down); the query is then re-run
   with feedback. Score: residual precision@20 (relevant among the first 20 hits not marked),
   mean over the words, for a grid of (alpha, beta, gamma) including (1, 0, 0) = no feedback.
2. **Near-duplicate collapse** (indexer.query.collapse_hits) on the skin-tone families (an emoji
   and its 5 tone variants share the caption's ``group``): for each family's base name as a text
   query, the top 30 are collapsed at several thresholds; a fold is right when the folded hit is
   of the same family as the hit it was folded into. Score: fold precision, and families whose
   variants in the top 30 all folded into one hit.
3. **Latency** (1 thread, p50 / p90 over the words): plain text search, a 3-term compositional
   query, the same with 6 feedback ids, and with collapse at the app's default.

    python bench/steer_quality.py                      # ~3 min on 2 cores (indexing 3,788 images)
    python bench/steer_quality.py --db /tmp/emoji-db   # reuse an index
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CAPTIONS = REPO / "demo" / "data" / "emoji" / "captions.jsonl"
MODEL = REPO / "demo" / "model"
WEIGHTS = [
    (1.0, 0.0, 0.0),
    (1.0, 0.5, 0.0),
    (1.0, 0.75, 0.0),
    (1.0, 0.5, 0.25),
    (1.0, 0.75, 0.25),  # ROCCHIO_DEFAULTS
    (1.0, 0.75, 0.5),
    (1.0, 1.0, 0.5),
    (1.0, 1.5, 0.5),
]
THRESHOLDS = (0.90, 0.93, 0.95, 0.97, 0.99)
_SKIN = {"skin", "tone", "light", "medium", "dark", "medium-light", "medium-dark"}
_WORD = re.compile(r"[a-z][a-z-]+")


def read_captions() -> list[dict]:
    rows = [json.loads(line) for line in CAPTIONS.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["path"] = str((CAPTIONS.parent / row["image"]).resolve())
    return rows


def category_words(rows: list[dict], count: int = 30) -> dict[str, set[str]]:
    """word -> paths of the emoji whose name has it, for ``count`` words naming 8..60 emoji."""
    by_word: dict[str, set[str]] = {}
    for row in rows:
        for word in set(_WORD.findall(row["text"].lower())) - _SKIN:
            if len(word) > 2:
                by_word.setdefault(word, set()).add(row["path"])
    eligible = sorted(
        (w for w, paths in by_word.items() if 8 <= len(paths) <= 60),
        key=lambda w: (-len(by_word[w]), w),
    )
    step = max(1, len(eligible) // count)  # spread over frequent and rarer words
    return {w: by_word[w] for w in eligible[::step][:count]}


def feedback_round(searcher, word, relevant, weights, depth=20):
    """Residual precision@depth after one round of simulated thumbs up / down."""
    from indexer import parse_query, run_query

    query = parse_query(word)
    first = run_query(searcher, query, "images", k=10)
    up = [h.id for h in first if h.path in relevant][:3]
    down = [h.id for h in first if h.path not in relevant][:3]
    marked = set(up) | set(down)
    again = run_query(
        searcher,
        query,
        "images",
        k=depth + len(marked),
        relevant=up,
        non_relevant=down,
        feedback_weights=weights,
    )
    residual = [h for h in again if h.id not in marked][:depth]
    return sum(h.path in relevant for h in residual) / depth


def collapse_scores(searcher, rows, threshold, families):
    from indexer import collapse_hits

    family_of = {r["path"]: r["group"] for r in rows}
    right = folds = whole = present = 0
    for base in families:
        raw = searcher.search(base, "images", k=30)
        vectors = searcher.get_vectors("images", [h.id for h in raw])
        kept = collapse_hits(raw, vectors, threshold)
        kept_ids = {h.id for h in kept}
        # replay the fold to see where each dropped hit went
        import numpy as np

        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        keep_rows = [i for i, h in enumerate(raw) if h.id in kept_ids]
        for i, hit in enumerate(raw):
            if hit.id in kept_ids:
                continue
            earlier = [j for j in keep_rows if j < i]
            target = raw[earlier[int(np.argmax(unit[earlier] @ unit[i]))]]
            folds += 1
            right += family_of.get(hit.path) == family_of.get(target.path)
        group = family_of.get(families[base])
        members = [h for h in raw if family_of.get(h.path) == group]
        if len(members) >= 2:
            present += 1
            whole += sum(h.id in kept_ids for h in members) == 1
    return folds, right, present, whole


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="index directory (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from app._ui import DEFAULT_COLLAPSE
    from indexer import Searcher, index_images, parse_query, run_query
    from indexer.query import ROCCHIO_DEFAULTS

    rows = read_captions()
    db = args.db or Path(tempfile.mkdtemp(prefix="steer-")) / "db"
    start = time.perf_counter()
    report = index_images([CAPTIONS], db, MODEL, num_workers=args.workers, device="cpu")
    print(f"index: {report} ({time.perf_counter() - start:.0f} s)")
    searcher = Searcher(db, device="cpu")
    words = category_words(rows)
    print(
        f"\n1. feedback: {len(words)} word queries, residual P@20 after 3 up + 3 down of the top 10"
    )
    print(f"   words: {', '.join(words)}")
    print(f"   {'alpha, beta, gamma':<20} {'P@20':>6}  vs no feedback")
    baseline = None
    for weights in WEIGHTS:
        score = statistics.mean(
            feedback_round(searcher, w, rel, weights) for w, rel in words.items()
        )
        baseline = score if baseline is None else baseline
        tag = "  (default)" if weights == ROCCHIO_DEFAULTS else ""
        print(f"   {str(weights):<20} {100 * score:6.1f}  {100 * (score - baseline):+6.1f}{tag}")

    counts = Counter(r["group"] for r in rows)
    families = {}
    for row in rows:
        if counts[row["group"]] >= 6 and "skin tone" not in row["text"]:
            families[row["text"]] = row["path"]
    print(
        f"\n2. collapse: {len(families)} skin-tone families, their base name as the query, top 30"
    )
    print(f"   {'threshold':<10} {'folds':>6} {'right':>7} {'families whole':>15}")
    for threshold in THRESHOLDS:
        folds, right, present, whole = collapse_scores(searcher, rows, threshold, families)
        tag = "  (app default)" if abs(threshold - DEFAULT_COLLAPSE) < 1e-9 else ""
        precision = f"{100 * right / folds:6.1f}%" if folds else "     -"
        print(f"   {threshold:<10} {folds:>6} {precision:>7} {whole:>7} / {present:<6}{tag}")

    print("\n3. latency, 1 thread, ms (p50 / p90 over the word queries)")
    ids = [h.id for h in searcher.search("cat", "images", k=6)]
    cases = {
        "plain text": lambda w: searcher.search(w, "images", k=10),
        "3 terms (2:w + red - blue)": lambda w: run_query(
            searcher, parse_query(f"2:{w} + red - blue"), "images", k=10
        ),
        "3 terms + 6 feedback ids": lambda w: run_query(
            searcher,
            parse_query(f"2:{w} + red - blue"),
            "images",
            k=10,
            relevant=ids[:3],
            non_relevant=ids[3:],
        ),
        f"+ collapse {DEFAULT_COLLAPSE}": lambda w: run_query(
            searcher,
            parse_query(f"2:{w} + red - blue"),
            "images",
            k=10,
            relevant=ids[:3],
            non_relevant=ids[3:],
            collapse=DEFAULT_COLLAPSE,
        ),
    }
    for name, run in cases.items():
        run("warm up")
        times = []
        for word in words:
            t0 = time.perf_counter()
            run(word)
            times.append(1000 * (time.perf_counter() - t0))
        print(f"   {name:<28} {percentile(times, 0.5):6.1f} / {percentile(times, 0.9):6.1f}")


if __name__ == "__main__":
    main()
