"""Helpers for training tests: manifests and a torchrun-like 2-process runner (gloo, CPU)."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def write_manifest(path: Path, pairs: list[tuple[Path, str]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"image": os.path.relpath(p, path.parent), "text": t}) + "\n"
            for p, t in pairs
        )
    )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, queue: Any, args: tuple
) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        # Bytes, not tensors: a tensor put on the queue is shared through a file descriptor
        # that dies with this process.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, buffer.getvalue(), None))
    except BaseException as exc:  # report to the parent instead of hanging it
        import traceback

        queue.put((rank, None, f"{exc!r}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 50
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes set up as torchrun would (gloo on
    CPU); returns the results by rank. ``fn`` must be importable (module level)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, value, error = queue.get(timeout=timeout)
            if error is not None:
                raise AssertionError(f"rank {rank} failed: {error}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [results[r] for r in range(world_size)]
