"""Shared test setup: 2 threads, fixed seeds, no network, tiny models only."""

from __future__ import annotations

import os
import random
import socket

# Busy-waiting OpenMP threads make tiny-model steps ~100x slower when other processes hold the
# two cores (measured on this machine); passive waiting costs nothing when they are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # type: ignore[no-untyped-def]
    # Tests may talk to servers they start on the loopback interface, and to nothing else.
    if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(f"test tried to reach the network: {address}")
    return _real_connect(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory: pytest.TempPathFactory):
    """A small sentencepiece model trained on the shapes captions (plus filler words)."""
    from beit3.tokenizer import train_sentencepiece
    from tests.data import caption_corpus

    out = tmp_path_factory.mktemp("spm") / "sentencepiece.bpe.model"
    return train_sentencepiece(caption_corpus(), out, vocab_size=300)


@pytest.fixture(scope="session")
def tokenizer(spm_path):
    from beit3.tokenizer import TextTokenizer

    return TextTokenizer(spm_path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """A randomly initialised beit3-tiny retrieval checkpoint directory (seeded)."""
    from beit3 import create_model, save_checkpoint

    torch.manual_seed(1234)
    model = create_model("beit3-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path, preset="beit3-tiny", tokenizer=tokenizer)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
