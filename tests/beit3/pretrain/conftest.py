"""Pretraining tests: tiny models on one thread, generated pairs, a trained tiny VQ-KD."""

from pathlib import Path

import pytest
import torch

from tests.beit3.pretrain.helpers import make_shapes_manifest, train_tiny_vqkd


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine are ~10x
    slower (OpenMP barriers under contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_manifest(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def vqkd_dir(tmp_path_factory: pytest.TempPathFactory, shapes_manifest: Path) -> Path:
    return train_tiny_vqkd(tmp_path_factory.mktemp("vqkd"), shapes_manifest)
