import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from beit3.pretrain.train import pretrain
from tests.beit3.pretrain.helpers import read_metrics, tiny_config

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config, tmp_path: Path, *script_args: str) -> None:
    path = tmp_path / f"{Path(config.output_dir).name}.json"
    path.write_text(json.dumps(dataclasses.asdict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(Path(__file__).with_name("dist_run.py")),
        str(path),
        *script_args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=50, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]


def _compare(one: Path, two: Path) -> None:
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in (
            "loss",
            "loss_text_mlm",
            "loss_image_mim",
            "loss_pair_mlm",
            "loss_pair_mim",
            "acc_pair_mlm",
            "grad_norm",
            "codebook_usage",
        ):
            assert rb[key] == pytest.approx(ra[key], rel=2e-4, abs=1e-5), (ra["step"], key)
    wa = load_file(str(one / "final" / "model.safetensors"))
    wb = load_file(str(two / "final" / "model.safetensors"))
    for key, value in wa.items():
        torch.testing.assert_close(wb[key], value, rtol=1e-3, atol=2e-5, msg=key)


@pytest.mark.dist
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(
    tmp_path, spm_path, shapes_manifest, vqkd_dir, sharding
):
    common = {"max_steps": 3, "log_every": 1, "save_every": 3}
    one = tiny_config(tmp_path / "one", spm_path, shapes_manifest, vqkd_dir, **common)
    pretrain(one)
    two = tiny_config(
        tmp_path / "two",
        spm_path,
        shapes_manifest,
        vqkd_dir,
        text_batch_size=8,
        image_batch_size=8,
        pair_batch_size=8,
        strategy=sharding,
        **common,
    )
    _torchrun(two, tmp_path)
    _compare(tmp_path / "one", tmp_path / "two")


@pytest.mark.dist
def test_two_process_tokenizer_training_saves_and_resumes(tmp_path, shapes_manifest):
    from beit3.pretrain.config import VisualTokenizerConfig
    from beit3.pretrain.vqkd import load_vqkd

    config = VisualTokenizerConfig(
        output_dir=str(tmp_path / "vq"),
        data=(str(shapes_manifest),),
        preset="vqkd-tiny",
        overrides={"codebook_size": 32},
        batch_size=4,
        max_steps=4,
        save_every=2,
        log_every=2,
        reseed_every=2,
        num_workers=0,
        tensorboard=False,
    )
    _torchrun(config, tmp_path, "vqkd")
    first = read_metrics(tmp_path / "vq")
    _torchrun(config.replace(max_steps=6, resume="latest"), tmp_path, "vqkd")
    both = read_metrics(tmp_path / "vq")
    assert [r["step"] for r in both] == [2, 4, 6]
    assert both[:2] == first  # continued from step 4 (a restart would log another lr schedule)
    assert sorted(p.name for p in (tmp_path / "vq" / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000006",
    ]
    assert load_vqkd(tmp_path / "vq" / "tokenizer").quantize.is_initialized
