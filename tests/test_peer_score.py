"""The peer benchmark's scorer (bench/peer/score.py) on hand-made score matrices."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "peer" / "score.py"
_spec = importlib.util.spec_from_file_location("peer_score", _PATH)
score = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(score)


def test_ranks_count_strictly_higher_ties_favour_query():
    scores = np.array(
        [
            [0.9, 0.1, 0.5],  # true col 0 is the best: rank 0
            [0.5, 0.5, 0.5],  # true col 1 ties both others: rank 0
            [0.8, 0.7, 0.2],  # true col 2 is beaten by two: rank 2
            [0.3, 0.6, 0.6],  # true cols 0 and 1: the best true (0.6) ties col 2: rank 0
        ]
    )
    truth = np.zeros((4, 3), dtype=bool)
    truth[0, 0] = truth[1, 1] = truth[2, 2] = truth[3, 0] = truth[3, 1] = True
    assert score.ranks(scores, truth).tolist() == [0, 0, 2, 0]


def test_recall_both_ways_on_identity_embeddings_with_a_shared_caption():
    # 3 images, 2 distinct captions: images 0 and 1 share caption 0, image 2 has caption 1.
    images = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    pairs = np.array([[0, 0], [1, 0], [2, 1]])
    m = score.recall(images, texts, pairs)
    # scores: img0 [1, 0], img1 [0.6, 0.8] (its caption 0 loses to caption 1), img2 [0, 1]
    assert m["i2t_r1"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == 100.0
    # caption 0: best true image 0 (1.0) -> rank 0; caption 1: image 2 (1.0) -> rank 0
    assert m["t2i_r1"] == m["t2i_r5"] == m["t2i_r10"] == 100.0
    assert m["rsum"] == pytest.approx(200 / 3 + 500)
    assert (m["num_images"], m["num_texts"]) == (3, 2)


def test_recall_all_tied_scores_count_as_hits():
    m = score.recall(
        np.ones((4, 3)), np.ones((5, 3)), np.array([[i, i] for i in range(4)] + [[0, 4]])
    )
    assert m["rsum"] == 600.0


def test_recall_rejects_a_caption_without_an_image():
    with pytest.raises(ValueError, match="no true candidate"):
        score.recall(np.eye(2), np.eye(2), np.array([[0, 0], [1, 0]]))


def test_score_file_reads_npz_and_run_metadata(tmp_path):
    path = tmp_path / "run.npz"
    np.savez(
        path,
        image_embeds=np.eye(2, dtype=np.float32),
        text_embeds=np.eye(2, dtype=np.float32)[::-1],
        pairs=np.array([[0, 0], [1, 1]]),
        images=np.array(["a.png", "b.png"]),
        texts=np.array(["a", "b"]),
    )
    (tmp_path / "run.json").write_text('{"system": "toy", "minutes": 1.0, "steps": 3}')
    row = score.score_file(path)
    # every true caption is second of two: R@1 misses, R@5 and R@10 hit, both ways
    assert (row["system"], row["steps"], row["rsum"]) == ("toy", 3, 400.0)
    assert "toy" in score.format_table([row])


def test_bootstrap_rsum_matches_the_binomial_standard_error():
    # 400 image queries, a quarter at rank 0 (hit at every k), the rest missing everything;
    # captions all hit: rsum = 3 * 25 + 300, SE = 3 * 100 * sqrt(p (1 - p) / n) for images only.
    i2t = np.array([0] * 100 + [50] * 300)
    t2i = np.zeros(200, dtype=np.int64)
    boot = score.bootstrap_rsum(i2t, t2i, samples=4000)
    assert boot.mean() == pytest.approx(375.0, abs=0.5)
    assert boot.std(ddof=1) == pytest.approx(300 * np.sqrt(0.25 * 0.75 / 400), rel=0.05)
    assert np.array_equal(boot, score.bootstrap_rsum(i2t, t2i, samples=4000))  # seeded


def test_paired_difference_of_one_run_with_itself_is_exactly_zero(tmp_path):
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    for name in ("a", "b"):
        np.savez(
            tmp_path / f"{name}.npz",
            image_embeds=images,
            text_embeds=texts,
            pairs=np.stack([np.arange(30), np.arange(30)], axis=1),
        )
    rows = [score.score_file(tmp_path / "a.npz"), score.score_file(tmp_path / "b.npz")]
    score.compare_to_first(rows)
    assert rows[0]["rsum_se"] > 0
    assert (rows[1]["vs_first"], rows[1]["vs_first_se"]) == (0.0, 0.0)
    assert "+0.0 +- 0.0" in score.format_table(rows)
