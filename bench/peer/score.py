"""The peer benchmark's one scorer: recall@1/5/10 both ways and rsum, from encoder outputs.

    python bench/peer/score.py RUN.npz [RUN.npz ...] [--json table.json]

Each ``.npz`` (written by ``openclip_train_eval.py`` or ``beit3_encode.py``) holds:

    image_embeds  (N_img, D) float32   one row per test image
    text_embeds   (M, D) float32       one row per DISTINCT test caption (each encoded once)
    pairs         (P, 2) int64         ground truth: (image row, caption row), every true pair
    images, texts (N_img,), (M,) str   what the rows are (for people; not used in scoring)

and may sit beside a ``RUN.json`` with the run's ``system``, ``minutes`` and ``steps``, which go
into the table. Scores are dot products (both encoders write L2-normalised vectors). A query's
rank is the number of candidates scoring strictly higher than its best true candidate, so ties
favour the query; R@k is the fraction of queries with rank < k, in percent; rsum is the sum of
the six recalls (at most 600). numpy only: it runs in the project's venv or the peer's.

Each rsum comes with its bootstrap standard error over the test queries (``BOOTSTRAP`` resamples
of the images and of the captions, each with replacement, seeded); rows after the first also get
the difference to the first row with the standard error of that difference, from the same
resamples (a paired bootstrap over the queries both runs answered).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KS = (1, 5, 10)
BOOTSTRAP = 2000


def ranks(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Rank of each row's best true column.

    Args:
        scores: (Q, C) float, query x candidate.
        truth: (Q, C) bool, True where the candidate is a right answer; every row has one.

    Returns:
        (Q,) int64: the number of candidates scoring strictly higher than the row's best true one.
    """
    if not truth.any(axis=1).all():
        missing = int(np.flatnonzero(~truth.any(axis=1))[0])
        raise ValueError(f"query row {missing} has no true candidate; every query needs one")
    best_true = np.where(truth, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    return (scores > best_true).sum(axis=1)


def recall(
    image_embeds: np.ndarray, text_embeds: np.ndarray, pairs: np.ndarray, ks=KS
) -> dict[str, float]:
    """Image->text and text->image R@k (percent) and rsum.

    Args:
        image_embeds: (N_img, D) float.
        text_embeds: (M, D) float, one row per distinct caption.
        pairs: (P, 2) int, (image row, caption row) for every true pair; every image and every
            caption must appear in at least one.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "rsum", "num_images", "num_texts"}``.
    """
    image_embeds = np.asarray(image_embeds, dtype=np.float64)
    text_embeds = np.asarray(text_embeds, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D, got images {image_embeds.shape}, texts {text_embeds.shape}"
        )
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"image embeddings are {image_embeds.shape[1]}-d but text embeddings "
            f"{text_embeds.shape[1]}-d; both must come from one model"
        )
    n_img, n_txt = len(image_embeds), len(text_embeds)
    if pairs.size and (pairs.min() < 0 or pairs[:, 0].max() >= n_img or pairs[:, 1].max() >= n_txt):
        raise ValueError(f"pairs index outside {n_img} images x {n_txt} texts")
    result: dict[str, float] = {}
    for name, r in zip(("i2t", "t2i"), query_ranks(image_embeds, text_embeds, pairs), strict=True):
        for k in ks:
            result[f"{name}_r{k}"] = 100.0 * float((r < k).mean())
    result["rsum"] = sum(v for key, v in result.items() if key[:3] in ("i2t", "t2i"))
    result.update(num_images=n_img, num_texts=n_txt)
    return result


def query_ranks(image_embeds: np.ndarray, text_embeds: np.ndarray, pairs: np.ndarray):
    """(image->text ranks (N_img,), text->image ranks (M,)), as :func:`recall` counts them."""
    scores = np.asarray(image_embeds, np.float64) @ np.asarray(text_embeds, np.float64).T
    truth = np.zeros(scores.shape, dtype=bool)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    truth[pairs[:, 0], pairs[:, 1]] = True
    return ranks(scores, truth), ranks(scores.T, truth.T)


def bootstrap_rsum(
    i2t: np.ndarray, t2i: np.ndarray, samples: int = BOOTSTRAP, seed: int = 0, ks=KS
) -> np.ndarray:
    """rsum of ``samples`` resamples of the queries (images and captions each drawn with
    replacement); one seed gives the same resamples to every run of a test set, so differences
    of the returned arrays are paired."""
    rng = np.random.default_rng(seed)
    out = np.zeros(samples)
    for r in (np.asarray(i2t), np.asarray(t2i)):
        idx = rng.integers(0, len(r), size=(samples, len(r)))
        drawn = r[idx]  # (samples, Q)
        out += sum(100.0 * (drawn < k).mean(axis=1) for k in ks)
    return out


def score_file(path: Path) -> dict:
    """recall() of one encoder output, with its run's metadata (``RUN.json``) when present, and
    ``rsum_se`` (:func:`bootstrap_rsum`); the resampled rsums are in ``_boot`` (not JSON)."""
    with np.load(path, allow_pickle=False) as data:
        embeds = data["image_embeds"], data["text_embeds"], data["pairs"]
        metrics = recall(*embeds)
        boot = bootstrap_rsum(*query_ranks(*embeds))
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {
        "system": meta.get("system", path.stem),
        **meta,
        **metrics,
        "rsum_se": float(boot.std(ddof=1)),
        "npz": str(path),
        "_boot": boot,
    }


def compare_to_first(rows: list[dict]) -> None:
    """Give each row after the first ``vs_first`` (rsum minus the first row's) and
    ``vs_first_se`` (paired bootstrap), when both were scored on the same test set."""
    first = rows[0]
    for row in rows[1:]:
        same = (row["num_images"], row["num_texts"]) == (first["num_images"], first["num_texts"])
        if same:
            row["vs_first"] = row["rsum"] - first["rsum"]
            row["vs_first_se"] = float((row["_boot"] - first["_boot"]).std(ddof=1))


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'system':38s} {'min':>5s} {'steps':>6s} "
        + " ".join(f"{p}@{k:<2d}" for p in ("i2t", "t2i") for k in KS)
        + f" {'rsum':>6s} {'+-SE':>5s}  vs first +- SE"
    )
    lines = [header]
    for row in rows:
        minutes = row.get("minutes")
        steps = row.get("steps")
        lines.append(
            f"{row['system']:38s} "
            + (f"{minutes:5.1f} " if isinstance(minutes, (int, float)) else f"{'-':>5s} ")
            + (f"{steps:6d} " if isinstance(steps, int) else f"{'-':>6s} ")
            + " ".join(f"{row[f'{p}_r{k}']:6.1f}" for p in ("i2t", "t2i") for k in KS)
            + f" {row['rsum']:6.1f}"
            + (f" {row['rsum_se']:5.1f}" if "rsum_se" in row else f" {'-':>5s}")
            + (
                f"  {row['vs_first']:+6.1f} +- {row['vs_first_se']:.1f}"
                if "vs_first" in row
                else ""
            )
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="encoder outputs (.npz)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for path in args.runs:
        if not path.is_file():
            print(f"error: {path} not found (did its run fail?)", file=sys.stderr)
            sys.exit(2)
        rows.append(score_file(path))
    compare_to_first(rows)
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
        args.json.write_text(json.dumps(public, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
