"""Pretraining on CUDA (skipped without it): bf16 run + resume, and no host syncs per step."""

import math

import pytest
import torch

from beit3.pretrain.data import build_streams
from beit3.pretrain.loss import MaskedModelingLoss
from beit3.pretrain.model import Beit3ForPretraining
from beit3.pretrain.train import (
    StepModule,
    build_optimizer,
    load_pretrained,
    model_config,
    pretrain,
    train_step,
)
from beit3.pretrain.vqkd import load_vqkd
from tests.beit3.pretrain.helpers import read_metrics, tiny_config

pytestmark = pytest.mark.gpu


def test_tiny_pretraining_on_cuda_in_bf16_resumes(tmp_path, spm_path, shapes_manifest, vqkd_dir):
    config = tiny_config(
        tmp_path / "run",
        spm_path,
        shapes_manifest,
        vqkd_dir,
        device="cuda",
        max_steps=4,
        save_every=2,
        num_workers=1,
    )
    pretrain(config)
    pretrain(config.replace(max_steps=6, resume="latest"))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    model = load_pretrained(tmp_path / "run" / "final", device="cuda")
    assert next(model.parameters()).is_cuda


def test_train_step_never_waits_for_the_device(tmp_path, spm_path, shapes_manifest, vqkd_dir):
    config = tiny_config(tmp_path, spm_path, shapes_manifest, vqkd_dir, device="cuda")
    device = torch.device("cuda")
    vqkd = load_vqkd(vqkd_dir, device=device)
    model = Beit3ForPretraining(model_config(config), vqkd.config.codebook_size).to(device)
    optimizer = build_optimizer(model, config, device)
    streams = build_streams(config, spm_path, img_size=32, grid_size=2, use_images=True)
    batches = [{k: next(s).to(device) for k, s in streams.items()} for _ in range(3)]
    forward, loss_fn = StepModule(model), MaskedModelingLoss()
    train_step(forward, model, optimizer, loss_fn, batches[0], vqkd, bf16=True, grad_clip=3.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            train_step(forward, model, optimizer, loss_fn, b, vqkd, bf16=True, grad_clip=3.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
