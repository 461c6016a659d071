import math

import pytest
import torch
import torch.nn.functional as F

from beit3 import create_model
from beit3.datasets import PairBatch
from beit3.run import DistInfo
from beit3.tokenizer import PAD_ID
from tests.training.helpers import run_distributed
from training import ClipLoss, ContrastiveTask, forward_backward

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


def test_single_process_loss_is_symmetric_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07))
    logits = images @ texts.T / 0.07
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    out = ClipLoss()(images, texts, log_scale)
    torch.testing.assert_close(out.loss, expected)
    # The logits the loss came from, for hard-negative mining: row i's own pair at labels[i].
    torch.testing.assert_close(out.logits_per_image, logits)
    torch.testing.assert_close(out.logits_per_text, logits.T)
    assert out.labels.tolist() == [0, 1, 2, 3, 4]
    # Aligned pairs at a high temperature scale: near zero.
    assert ClipLoss()(images, images, torch.tensor(5.0)).loss < 1e-3


def _batch(n: int, seed: int) -> PairBatch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (n, 6), generator=gen)
    ids[n // 2 :, 4:] = PAD_ID
    return PairBatch(
        torch.randn(n, 3, 32, 32, generator=gen),
        ids,
        ids.eq(PAD_ID),
        torch.arange(n),
        torch.arange(n),
    )


def _slice(batch: PairBatch, lo: int, hi: int) -> PairBatch:
    return PairBatch(*(t[lo:hi] for t in batch))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(state, splits):
    """Each rank: the tiny model under DDP on its slice of the same global batch."""
    from torch.nn.parallel import DistributedDataParallel

    from beit3.run import init_distributed

    info = init_distributed("cpu")
    out = []
    for split in splits:
        model = create_model("beit3-tiny", vocab_size=100)
        model.load_state_dict(state)
        model.beit3.vision_embed.mask_token.requires_grad_(False)
        ddp = DistributedDataParallel(model)
        lo = sum(split[: info.rank])
        local = _slice(_batch(sum(split), 1), lo, lo + split[info.rank])
        loss = forward_backward(ddp, ContrastiveTask(info), local, info.device, False).loss
        out.append((loss, _grads(model)))
    return out


@pytest.mark.dist
def test_two_process_loss_and_gradients_equal_one_process_on_the_global_batch():
    torch.manual_seed(0)
    model = create_model("beit3-tiny", vocab_size=100)
    model.beit3.vision_embed.mask_token.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    splits = [(4, 4), (3, 5)]  # equal shards (the official case) and a short one
    results = run_distributed(_ddp_worker, state, splits)
    for case, split in enumerate(splits):
        model.zero_grad()
        full_loss = forward_backward(
            model, ContrastiveTask(ONE), _batch(sum(split), 1), torch.device("cpu"), False
        ).loss
        full_grads = _grads(model)
        rank_losses = [r[case][0] for r in results]
        # The ranks' losses average to the global one; DDP's averaged gradients are the global
        # gradients (equivalently, the ranks' un-averaged gradients sum to world x global).
        torch.testing.assert_close(sum(rank_losses) / 2, full_loss, rtol=1e-5, atol=1e-6)
        for rank_loss in rank_losses:
            assert not torch.isclose(rank_loss, full_loss)  # each rank only holds its share
        for _, grads in (r[case] for r in results):
            assert grads.keys() == full_grads.keys()
            for name, grad in full_grads.items():
                # float32 summation order differs: tolerance relative to the tensor's scale
                # (the key-projection bias has a true gradient of 0: noise only).
                atol = 1e-4 * float(grad.abs().max()) + 1e-7
                torch.testing.assert_close(
                    grads[name], grad, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
                )
