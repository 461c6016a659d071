"""Step checkpoints: the one on-disk layout of a resumable run, for every trainer.

``output_dir/checkpoints/step-XXXXXXXX/`` holds the trainer's weights (written by a callback:
a checkpoint directory for the BEiT-3 trainers, a tokenizer directory for VQ-KD) and
``trainer_state.pt``: step, the *full* optimizer state keyed by parameter name (the same file
for one process, DDP and FSDP), every RNG of the process, each rank's torch RNG, and the
trainer's ``extra`` (data position, best score...). ``trainer_state.pt`` is written last, by
rename, so a step directory without it is incomplete and ignored.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from beit3.errors import ConfigError
from beit3.run.process import (
    DistInfo,
    barrier,
    gather_rng_states,
    set_rank_rng_state,
)
from beit3.run.wrap import full_model_state, full_optimizer_state, load_full_optimizer_state

__all__ = [
    "STATE_FILE",
    "WeightsWriter",
    "find_latest",
    "load_step_weights",
    "restore_step",
    "resume_step_dir",
    "save_step",
    "step_directory",
]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.pt"
# (directory, full model state dict) -> None: writes the weights of a step (rank 0 only).
WeightsWriter = Callable[[Path, dict[str, Tensor]], None]


def step_directory(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step-XXXXXXXX``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _rng_state() -> dict[str, Any]:
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": mt,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list | tuple) else value


def save_step(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    write_weights: WeightsWriter,
    info: DistInfo,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a step directory (a collective: every rank calls it; rank 0 writes).

    Args:
        model: the module that owns the parameters (plain or FSDP-sharded; not a DDP wrapper).
        optimizer: its optimizer; saved full, keyed by parameter name.
        write_weights: writes ``model.safetensors`` and whatever makes the directory loadable.
        extra: the trainer's own state (tensors, numbers, strings, lists, dicts).
        keep: how many of the newest step directories to keep.
    """
    model_state = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    rank_rng = gather_rng_states()
    directory = step_directory(run_dir, step)
    if info.is_main:
        write_weights(directory, model_state)
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "rng": _rng_state(),
            "rank_rng": rank_rng,
            "world_size": info.world_size,
            "extra": extra or {},
            "time": time.time(),
        }
        tmp = directory / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.rename(directory / STATE_FILE)
        for old in _step_dirs(Path(run_dir))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved training state at step %d to %s", step, directory)
    barrier()
    return directory


def load_step_weights(step_dir: str | Path, model: nn.Module, preset: str = "?") -> None:
    """Load a step's ``model.safetensors`` into ``model`` strictly (before wrapping it)."""
    from safetensors.torch import load_file

    from beit3.checkpoint import load_state_dict_checked

    state = load_file(str(Path(step_dir) / "model.safetensors"))
    load_state_dict_checked(model, state, source=str(step_dir), preset=preset)


def restore_step(
    step_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: DistInfo,
) -> dict[str, Any]:
    """Restore the optimizer and every RNG from a step directory (weights: see
    :func:`load_step_weights`). Each rank gets its own torch RNG back when the saved run had
    as many processes; otherwise the rank streams start afresh (and ``rank_rng_restored`` is
    False, so the caller may re-seed).

    Returns:
        ``{"step": int, "extra": dict, "rank_rng_restored": bool}``.
    """
    step_dir = Path(step_dir)
    saved = torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        load_full_optimizer_state(model, optimizer, saved["optimizer"])
    _set_rng_state(saved["rng"])
    same_world = saved.get("world_size", 1) == info.world_size
    restored = same_world and set_rank_rng_state(saved.get("rank_rng", []), info.rank)
    logger.info("resumed from %s (step %d)", step_dir, saved["step"])
    return {
        "step": int(saved["step"]),
        "extra": saved.get("extra", {}),
        "rank_rng_restored": restored,
    }


def _step_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete step directory of a run, or None."""
    dirs = _step_dirs(Path(run_dir))
    return dirs[-1] if dirs else None


def resume_step_dir(resume: str | None, out: str | Path) -> Path | None:
    """The step directory a run in ``out`` continues from, or None for a fresh run.

    Args:
        resume: None (a fresh run: refused if ``out`` already holds checkpoints, so that a
            finished or interrupted run is never overwritten by mistake), ``"latest"`` (the
            newest complete step of ``out``; a fresh run if there is none yet), or a step
            directory.
    """
    out = Path(out)
    if resume is None:
        latest = find_latest(out)
        if latest is not None:
            raise ConfigError(
                f"{out} already holds a run (last checkpoint {latest.name}); pass --resume "
                "latest to continue it, or choose another --output-dir"
            )
        return None
    if resume == "latest":
        latest = find_latest(out)
        if latest is None:
            logger.info("--resume latest: %s has no checkpoint yet, starting fresh", out)
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            f"--resume {path}: not a complete step checkpoint (no {STATE_FILE}); "
            f"use 'latest' or a directory under {out / 'checkpoints'}"
        )
    return path
