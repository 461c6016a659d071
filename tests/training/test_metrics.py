import pytest
import torch
import torch.nn.functional as F

from training import average_recall, format_table, recall_at_k, retrieval_recall

# 3 images, 5 captions: image 0 owns captions 0-1, image 1 caption 2, image 2 captions 3-4.
OWNER = [0, 0, 1, 2, 2]
SCORES = torch.tensor(
    [
        [0.10, 0.90, 0.80, 0.30, 0.20],
        [0.70, 0.60, 0.50, 0.90, 0.10],
        [0.20, 0.95, 0.30, 0.40, 0.35],
    ]
)


def test_recall_on_hand_made_scores_matches_hand_computation():
    got = recall_at_k(SCORES, OWNER, ks=(1, 2, 4))
    # Image->text, rank of each image's best caption among the other captions:
    #   image 0: caption 1 (0.90) is first -> 0; image 1: caption 2 (0.50) is beaten by
    #   0.70, 0.60, 0.90 -> 3; image 2: caption 3 (0.40) is beaten by 0.95 -> 1.
    assert got["i2t_r1"] == pytest.approx(1 / 3)
    assert got["i2t_r2"] == pytest.approx(2 / 3)
    assert got["i2t_r4"] == pytest.approx(1.0)
    # Text->image, rank of the true image in each column:
    #   caption 0: 0.10 vs 0.70, 0.20 -> 2; caption 1: 0.90 vs 0.95 -> 1;
    #   caption 2: 0.50 vs 0.80 -> 1; caption 3: 0.40 vs 0.90 -> 1; caption 4: 0.35 best -> 0.
    assert got["t2i_r1"] == pytest.approx(1 / 5)
    assert got["t2i_r2"] == pytest.approx(4 / 5)
    assert got["t2i_r4"] == pytest.approx(1.0)
    assert got["average"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1 / 5 + 4 / 5 + 1) / 6)
    assert average_recall(got) == pytest.approx(got["average"])


def test_ties_break_by_index_so_a_collapsed_model_scores_chance():
    got = recall_at_k(torch.full((4, 4), 0.5), [0, 1, 2, 3], ks=(1, 4))
    # Only the first image / caption wins its tie: chance level, not a perfect score.
    assert got["i2t_r1"] == got["t2i_r1"] == 0.25
    assert got["i2t_r4"] == got["t2i_r4"] == 1.0


def test_image_without_captions_is_left_out_of_image_to_text():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    got = recall_at_k(scores, [0, 1], ks=(1,))
    assert got["i2t_r1"] == 1.0  # over images 0 and 1 only
    assert got["t2i_r1"] == 1.0


@pytest.mark.parametrize("block_size", [1, 3, 512])
def test_blocked_embedding_recall_equals_full_matrix(block_size):
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(7, 16, generator=gen), dim=-1)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6])
    texts = F.normalize(images[owner] + 0.9 * torch.randn(11, 16, generator=gen), dim=-1)
    full = recall_at_k(images @ texts.T, owner)
    assert retrieval_recall(images, texts, owner, block_size=block_size) == full
    assert 0 < full["i2t_r1"] < 1 and full["t2i_r10"] == 1.0


def test_table_prints_percentages():
    table = format_table(
        {
            **recall_at_k(SCORES, OWNER, ks=(1, 5, 10)),
            "num_images": 3,
            "num_texts": 5,
            "skipped_images": 0,
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10"]
    assert lines[1].split() == ["image->text", "33.33", "100.00", "100.00"]
    assert lines[2].split() == ["text->image", "20.00", "100.00", "100.00"]
    assert lines[3].startswith("average 75.56  (3 images, 5 captions")
