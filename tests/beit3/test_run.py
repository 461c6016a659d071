import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beit3 import create_model, save_checkpoint
from beit3.run import (
    DistInfo,
    RunLogger,
    cosine_lr,
    find_latest,
    gather_features,
    load_step_weights,
    param_groups,
    restore_step,
    save_step,
    set_lr,
    write_run_config,
)
from beit3.run.optim import layer_id

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


def _save(tmp_path, step, model, opt, tokenizer, **kwargs):
    def write(directory, state):
        save_checkpoint(model, directory, preset="beit3-tiny", tokenizer=tokenizer)

    return save_step(
        tmp_path, step, model=model, optimizer=opt, write_weights=write, info=ONE, **kwargs
    )


def test_cosine_schedule_warms_up_from_zero_then_decays_to_min():
    values = [cosine_lr(s, 100, 10, 1e-3, 1e-5) for s in range(101)]
    assert values[0] == 0.0
    assert values[5] == pytest.approx(5e-4)
    assert values[10] == pytest.approx(1e-3)
    assert values[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert values[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_param_groups_follow_official_decay_rules():
    model = create_model("beit3-tiny")
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.65)
    by_name = {n: g for g in groups for n in g["names"]}
    depth = model.config.depth  # 2
    assert by_name["beit3.text_embed.weight"]["weight_decay"] == 0.05  # decayed, officially
    assert by_name["beit3.encoder.embed_positions.A.weight"]["weight_decay"] == 0.0
    assert by_name["beit3.encoder.embed_positions.B.weight"]["weight_decay"] == 0.05
    assert by_name["beit3.vision_embed.cls_token"]["weight_decay"] == 0.0
    assert by_name["beit3.encoder.layers.0.ffn.A.fc1.bias"]["weight_decay"] == 0.0
    assert by_name["logit_scale"]["weight_decay"] == 0.0
    assert by_name["beit3.text_embed.weight"]["lr_scale"] == pytest.approx(0.65 ** (depth + 1))
    assert by_name["beit3.encoder.layers.1.self_attn.q_proj.A.weight"]["lr_scale"] == pytest.approx(
        0.65
    )
    assert by_name["vision_head.weight"]["lr_scale"] == 1.0
    assert layer_id("beit3.encoder.layer_norm.A.weight", depth) == depth + 1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    set_lr(opt, 1e-3)
    assert {round(g["lr"] / 1e-3, 6) for g in opt.param_groups} == {
        round(0.65**k, 6) for k in range(depth + 2)
    }


def test_train_state_round_trip_restores_weights_optimizer_and_rng(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = create_model("beit3-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.encode_text(*tokenizer(["a red circle"])).sum().backward()
    opt.step()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    _save(tmp_path, 7, model, opt, tokenizer, extra={"epoch": 1, "batch": 3})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    # An incomplete newer step (no trainer_state.pt) is ignored.
    (tmp_path / "checkpoints" / "step-00000009").mkdir()
    latest = find_latest(tmp_path)
    assert latest.name == "step-00000007"

    other = create_model("beit3-tiny")
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    load_step_weights(latest, other)
    info = restore_step(latest, other, other_opt, ONE)
    assert info == {"step": 7, "extra": {"epoch": 1, "batch": 3}, "rank_rng_restored": True}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    saved, restored = opt.state_dict()["state"], other_opt.state_dict()["state"]
    # Parameters that never had a gradient get a fresh (zero) state from the loader.
    assert saved.keys() <= restored.keys()
    assert saved
    assert all(torch.equal(saved[k]["exp_avg"], restored[k]["exp_avg"]) for k in saved)


def test_only_newest_steps_are_kept(tmp_path, tokenizer):
    model = create_model("beit3-tiny")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt, tokenizer, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]


def test_run_logger_and_run_config(tmp_path):
    log = RunLogger(tmp_path, log_every=2, tensorboard=False)
    for step in range(1, 6):
        log.log(step, loss=1.0 / step)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert '"step": 4' in lines[1]
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 1e-3

    text = write_run_config(tmp_path, Cfg()).read_text()
    assert '"lr": 0.001' in text
    assert '"git_sha"' in text


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = torch.randn(4, 3, requires_grad=True)
    local = full.detach()[rank * 2 : rank * 2 + 2].clone().requires_grad_(True)
    gathered = gather_features(local)
    weights = torch.arange(12.0).reshape(4, 3)
    (gathered * weights).sum().pow(2).backward()
    # numpy arrays travel by value: a tensor in a queue is shared through a file descriptor that
    # this process serves, and it may exit before the parent has taken it (FileNotFoundError).
    queue.put((rank, gathered.detach().numpy(), local.grad.numpy()))
    dist.destroy_process_group()


@pytest.mark.dist
def test_gathered_features_give_single_process_gradients():
    torch.manual_seed(0)
    full = torch.randn(4, 3, requires_grad=True)
    weights = torch.arange(12.0).reshape(4, 3)
    (full * weights).sum().pow(2).backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {
        r: (torch.as_tensor(g), torch.as_tensor(grad))
        for r, g, grad in (queue.get(timeout=60) for _ in procs)
    }
    for p in procs:
        p.join(timeout=60)
    for rank in range(2):
        gathered, grad = results[rank]
        torch.testing.assert_close(gathered, full.detach())
        # Both ranks computed the whole loss, and the backward sums over ranks: 2x the slice.
        torch.testing.assert_close(grad, 2 * full.grad[rank * 2 : rank * 2 + 2])


def test_clipped_step_scales_the_gradient_to_the_norm_and_reports_the_norm_before():
    from beit3.run import clipped_step

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    (100.0 * model(torch.ones(2, 4)).sum()).backward()
    full = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    norm = clipped_step(model, opt, 0.5)
    assert norm.item() == pytest.approx(full.item()) and full > 10
    moved = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert moved.item() == pytest.approx(0.5, rel=1e-4)  # SGD lr 1: the step is the clipped grad
    assert all(p.grad is None for p in model.parameters())
    (model(torch.ones(2, 4)).sum()).backward()
    small = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    kept = [p.detach().clone() for p in model.parameters()]
    assert clipped_step(model, opt, 0.0).item() == pytest.approx(small.item())  # 0: no clipping
    moved = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), kept, strict=True))
    )
    assert moved.item() == pytest.approx(small.item(), rel=1e-4)
