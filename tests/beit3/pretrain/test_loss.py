import pytest
import torch
import torch.nn.functional as F

from beit3 import create_model
from beit3.errors import ConfigError
from beit3.pretrain.loss import MaskedModelingLoss, masked_cross_entropy
from beit3.pretrain.masking import IGNORE_INDEX
from beit3.pretrain.model import Beit3ForPretraining, gather_positions


def test_only_masked_positions_contribute():
    logits = torch.randn(2, 6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    stats = masked_cross_entropy(logits, torch.where(mask, targets, IGNORE_INDEX))
    stats.loss_sum.backward()
    assert stats.count.item() == 4
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask].abs().sum(-1) > 0).all()
    expected = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    assert torch.allclose(stats.loss_sum, expected)
    # Other targets at unmasked positions: the same loss.
    other = torch.where(mask, targets, (targets + 3) % 11)
    again = masked_cross_entropy(logits, torch.where(mask, other, IGNORE_INDEX))
    assert torch.equal(again.loss_sum, stats.loss_sum)
    correct = (logits[mask].argmax(-1) == targets[mask]).sum()
    assert stats.correct.item() == correct.item()


def test_global_normalisation_matches_one_process():
    # Two ranks with different masked counts; DDP averages their gradients. The per-rank loss
    # sum * world / global_count must give the gradient of the global token mean.
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 3:] = IGNORE_INDEX  # rank 0: 3 tokens, rank 1: 5 tokens
    loss_fn = MaskedModelingLoss()
    single = loss_fn(
        {"text_mlm": masked_cross_entropy(logits, targets)},
        {"text_mlm": torch.tensor(8.0)},
        world_size=1,
    )
    (grad_single,) = torch.autograd.grad(single, logits)
    per_rank = [
        loss_fn(
            {"text_mlm": masked_cross_entropy(logits[r : r + 1], targets[r : r + 1])},
            {"text_mlm": torch.tensor(8.0)},
            world_size=2,
        )
        for r in range(2)
    ]
    (grad_ddp,) = torch.autograd.grad(sum(per_rank) / 2, logits)  # DDP's average
    assert torch.allclose(grad_single, grad_ddp, atol=1e-7)
    assert torch.allclose(single, sum(per_rank) / 2)


def test_mixing_weights_and_pair_parts():
    stats = {
        part: masked_cross_entropy(torch.randn(1, 4, 5), torch.randint(0, 5, (1, 4)))
        for part in ("text_mlm", "image_mim", "pair_mlm", "pair_mim")
    }
    counts = {part: torch.tensor(4.0) for part in stats}
    means = {part: s.loss_sum / 4 for part, s in stats.items()}
    total = MaskedModelingLoss(text_weight=0.5, image_weight=0.0, pair_weight=2.0)(stats, counts)
    expected = 0.5 * means["text_mlm"] + 2.0 * (means["pair_mlm"] + means["pair_mim"])
    assert torch.allclose(total, expected)
    with pytest.raises(ConfigError, match="no part"):
        MaskedModelingLoss(text_weight=0)({"text_mlm": stats["text_mlm"]}, counts)
    with pytest.raises(ConfigError):
        MaskedModelingLoss(text_weight=-1)


def test_heads_predict_at_the_listed_positions_only():
    torch.manual_seed(0)
    model = Beit3ForPretraining(
        create_model("beit3-tiny").config.replace(vocab_size=50), codebook_size=12
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, 50, (2, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    image_mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    text_positions = torch.tensor([[1, 4, 5], [2, 0, 0]])
    image_positions = torch.tensor([[0, 3], [1, 1]])
    out = model(images, ids, pad, image_mask, text_positions, image_positions)
    assert out.mlm_logits.shape == (2, 3, 50) and out.mim_logits.shape == (2, 2, 12)
    hidden = model.beit3(images, ids, pad, image_mask).hidden_states  # (B, 5 + 7, D)
    assert torch.allclose(
        out.mlm_logits, model.mlm_head(gather_positions(hidden[:, 5:], text_positions))
    )
    assert torch.allclose(out.mim_logits[0, 1], model.mim_head(hidden[0, 1 + 3]))
    # A text-only pass makes no image logits.
    text_only = model(text_ids=ids, padding_mask=pad, text_positions=text_positions)
    assert text_only.mim_logits is None


def test_pretraining_checkpoint_transfers_its_backbone_to_retrieval(tmp_path, tokenizer):
    from beit3 import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model("beit3-tiny", "pretraining")
    assert {"mlm_head.weight", "mim_head.bias"} <= set(model.state_dict())
    save_checkpoint(model, tmp_path / "ckpt", preset="beit3-tiny", tokenizer=tokenizer)
    retrieval = load_checkpoint(tmp_path / "ckpt", architecture="retrieval").model
    for key, value in model.beit3.state_dict().items():
        assert torch.equal(value, retrieval.beit3.state_dict()[key]), key
