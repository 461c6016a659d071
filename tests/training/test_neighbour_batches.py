"""Neighbour batches: batches built from groups of pairs the start model finds alike."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from beit3 import ConfigError, InputDataError, load_checkpoint
from beit3.data import read_pairs
from training import FinetuneConfig, finetune
from training.data import NeighbourSampler, nearest_pairs
from training.evaluate import embed_pairs


def _clusters(seed=0):
    """40 pairs in 10 tight clusters of 4; pairs 0 and 1 share an image, 2 and 3 a caption."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(10, 16, generator=gen), dim=1)
    cluster = torch.arange(40) // 4
    noise = lambda: 0.05 * torch.randn(40, 16, generator=gen)  # noqa: E731
    image_embeds = F.normalize(centres[cluster] + noise(), dim=1)
    text_embeds = F.normalize(centres[cluster] + noise(), dim=1)
    image_ids = [f"img{i}" for i in range(40)]
    image_ids[1] = "img0"
    texts = [f"caption {i}" for i in range(40)]
    texts[3] = texts[2]
    return image_embeds, text_embeds, image_ids, texts, cluster


def test_nearest_pairs_are_the_closest_pairs_of_other_images():
    image_embeds, text_embeds, image_ids, _, cluster = _clusters()
    neighbours = nearest_pairs(image_embeds, text_embeds, image_ids, k=2, block=7)
    assert neighbours.shape == (40, 2)
    for i in range(40):
        assert all(cluster[j] == cluster[i] for j in neighbours[i].tolist()), i
        assert all(image_ids[j] != image_ids[i] for j in neighbours[i].tolist()), i
    # Exactly the brute-force ranking by the mean of the two cosines.
    sims = (image_embeds @ image_embeds.T + text_embeds @ text_embeds.T) / 2
    sims[0, 1] = sims[1, 0] = -9  # one image
    sims.fill_diagonal_(-9)
    assert torch.equal(neighbours, sims.topk(2, dim=1).indices)
    # Fewer other pairs than k: padded with -1.
    few = nearest_pairs(image_embeds[:3], text_embeds[:3], ["a", "a", "b"], k=4)
    assert few.tolist() == [[2, -1, -1, -1], [2, -1, -1, -1], [0, 1, -1, -1]]


def test_sampler_batches_neighbourhoods_once_each_without_clashes():
    image_embeds, text_embeds, image_ids, texts, cluster = _clusters()
    neighbours = nearest_pairs(image_embeds, text_embeds, image_ids, k=8)
    sampler = NeighbourSampler(neighbours, image_ids, texts, batch_size=8, group=4, seed=1)
    order = sampler.order(0)
    assert sorted(order) == list(range(40))  # every pair once
    same_cluster = 0
    for lo in range(0, 40, 8):
        batch = order[lo : lo + 8]
        assert len({image_ids[i] for i in batch}) == len(batch), batch  # no image twice
        assert len({texts[i] for i in batch}) == len(batch), batch  # no caption twice
        same_cluster += sum(cluster[a] == cluster[b] for a in batch for b in batch if a != b)
    # Random batches of 8 from 40 hold ~3/39 of a pair's 3 cluster-mates: here most of them.
    assert same_cluster / 40 >= 2.0, same_cluster / 40
    # Deterministic per (seed, epoch); another epoch is another order.
    again = NeighbourSampler(neighbours, image_ids, texts, batch_size=8, group=4, seed=1)
    assert again.order(0) == order and again.order(1) != order
    # Two processes: rank r takes every second index of the global order, so each global batch
    # (2 x 4 consecutive) is split between the ranks and its neighbourhoods stay together.
    ranks = [
        NeighbourSampler(
            neighbours, image_ids, texts, batch_size=4, group=4, rank=r, world_size=2, seed=1
        )
        for r in (0, 1)
    ]
    assert ranks[0].order(0) == order
    assert ranks[0].indices(0) == order[0::2] and ranks[1].indices(0) == order[1::2]
    ranks[1].set_position(0, 3)
    assert list(ranks[1]) == order[1::2][3:]  # resumes mid-epoch
    with pytest.raises(InputDataError, match="neighbour lists for 39 pairs"):
        NeighbourSampler(neighbours[:39], image_ids, texts, batch_size=8, group=4)


def _run(shapes, checkpoint, name, **changes):
    base = dict(
        train=str(shapes["train"]),
        output_dir=str(shapes["root"] / name),
        init=str(checkpoint),
        batch_size=16,
        max_steps=6,
        save_every=3,
        lr=1e-3,
        num_workers=0,
        tensorboard=False,
        log_every=1,
        neighbour_batches=4,
        seed=2,
    )
    return FinetuneConfig(**{**base, **changes})


class _Stop(Exception):
    pass


def test_finetune_with_neighbour_batches_keeps_them_across_a_resume(shapes, tiny_checkpoint):
    straight = finetune(_run(shapes, tiny_checkpoint, "straight"))
    neighbours = load_file(str(shapes["root"] / "straight" / "neighbours.safetensors"))[
        "neighbours"
    ]
    # The start model's neighbours of the 64 training pairs.
    start = load_checkpoint(tiny_checkpoint)
    records = read_pairs(shapes["train"])
    embeds = embed_pairs(start.model, start.tokenizer, start.preprocess, records, batch_size=16)
    assert torch.equal(neighbours, nearest_pairs(*embeds, [r.image_id for r in records], 16))

    def stop_at_5(step, total):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(_run(shapes, tiny_checkpoint, "stopped"), progress=stop_at_5)
    resumed = finetune(_run(shapes, tiny_checkpoint, "stopped", resume="latest"))

    def losses(run):
        lines = (shapes["root"] / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    want, got = losses("straight"), losses("stopped")
    assert list(got) == list(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    a, b = load_checkpoint(straight).model.state_dict(), load_checkpoint(resumed).model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    # Random batches give other losses from the first step on (the same seed and start).
    finetune(_run(shapes, tiny_checkpoint, "plain", neighbour_batches=0))
    assert losses("plain")[1] != pytest.approx(want[1], abs=1e-4)
    # A resume must build its batches the same way.
    with pytest.raises(ConfigError, match="neighbour_batches"):
        finetune(_run(shapes, tiny_checkpoint, "stopped", resume="latest", neighbour_batches=8))
    with pytest.raises(ConfigError, match="group size >= 2"):
        _run(shapes, tiny_checkpoint, "bad", neighbour_batches=1)
