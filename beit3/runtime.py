"""Training runtime shared by pretraining and fine-tuning.

Distributed setup (torchrun), a differentiable feature gather, optimizer parameter groups with the
official weight-decay and layer-decay rules, the warmup + cosine schedule, resumable training
state, and run logs. Model code (model.py, heads.py) never imports this module.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from beit3.errors import ConfigError

__all__ = [
    "DistInfo",
    "RunLogger",
    "autocast",
    "cosine_lr",
    "find_latest",
    "resume_step_dir",
    "gather_features",
    "gather_rng_states",
    "init_distributed",
    "load_train_state",
    "param_groups",
    "rank_rng_state",
    "resolve_device",
    "save_train_state",
    "set_lr",
    "set_rank_rng_state",
    "write_run_config",
]

logger = logging.getLogger(__name__)


# Distributed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        atexit.register(destroy_process_group)
    return DistInfo(rank, world_size, local_rank, target)


def destroy_process_group() -> None:
    """Tear the group down while Python is still whole. Left to the interpreter's exit, a gloo
    worker thread can still be releasing the tensors of the last collective when finalisation
    starts; it then needs the GIL, is unwound by the exiting interpreter inside a noexcept
    destructor, and the process aborts ("terminate called without an active exception",
    SIGABRT after all the work is done: seen in about 1 run in 25 of a 2-process test; gdb
    showed ProcessGroupGloo::runLoop -> ~AsyncWork -> decref -> take_gil -> pthread_exit).
    Collecting garbage first drops the last references to the group (a DDP wrapper in a
    reference cycle), so destroying it joins its worker threads here."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


class _GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's
    slice, so a loss over gathered features gets the same gradients as one big process."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_features(x: Tensor) -> Tensor:
    """(B, D) per rank -> (world * B, D), rank-major, differentiable; identity without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherLayer.apply(x), dim=0)


def rank_rng_state() -> dict[str, Tensor]:
    """This process's torch RNG (drop path draws), CPU and current CUDA device."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict[str, Tensor]]:
    """Every rank's :func:`rank_rng_state`, in rank order (a collective when distributed): each
    rank draws its own drop-path masks, so a resume must restore each rank's own stream."""
    state = rank_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def set_rank_rng_state(states: list[dict[str, Tensor]], rank: int) -> bool:
    """Restore this rank's RNG from :func:`gather_rng_states`; False (nothing restored) when the
    saved run had another number of processes."""
    if not states or rank >= len(states):
        return False
    torch.set_rng_state(states[rank]["cpu"])
    if "cuda" in states[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])
    return True


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (bf16 is ~100x slower there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Optimisation ----------------------------------------------------------------------------

# Official BEiT3Wrapper.no_weight_decay() (the text table, B positions and mask token ARE decayed).
NO_WEIGHT_DECAY = frozenset(
    {
        "beit3.encoder.embed_positions.A.weight",
        "beit3.vision_embed.cls_token",
        "logit_scale",
    }
)


def layer_id(name: str, num_layers: int) -> int:
    """Official layer-decay id: embeddings 0, layer k -> k + 1, everything else L + 1."""
    if "embed" in name:
        return 0
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: no decay for 1-D tensors, biases and NO_WEIGHT_DECAY; each group carries an
    ``lr_scale`` = layer_decay ** (L + 1 - layer_id) (1 when layer_decay is None)."""
    if num_layers is None:
        num_layers = getattr(getattr(model, "config", None), "depth", 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.removeprefix("module.").removeprefix("_orig_mod.")  # DDP / compile wrappers
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in NO_WEIGHT_DECAY
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0
) -> float:
    """Linear warmup from 0 (as the official code), then cosine decay to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# Resumable state -------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.pt"


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


class _HasStateDict(Protocol):
    def state_dict(self) -> dict[str, Any]: ...


def save_train_state(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | _HasStateDict,
    preset: str,
    tokenizer: Any,
    preprocess: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step-XXXXXXXX/``: a checkpoint directory (loadable by
    ``beit3.load_checkpoint``) plus ``trainer_state.pt`` (optimizer, step, RNG, ``extra`` such as
    the data position). ``trainer_state.pt`` is written last, by rename: a step directory without
    it is incomplete and ignored by :func:`find_latest`. Keeps the newest ``keep`` steps.

    ``model`` must be the unwrapped module (not DDP / compiled).
    """
    from beit3.checkpoint import save_checkpoint

    directory = step_directory(run_dir, step)
    save_checkpoint(model, directory, preset=preset, tokenizer=tokenizer, preprocess=preprocess)
    return finish_step_directory(run_dir, step, optimizer=optimizer, extra=extra, keep=keep)


def step_directory(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step-XXXXXXXX``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def finish_step_directory(
    run_dir: str | Path,
    step: int,
    *,
    optimizer: torch.optim.Optimizer | _HasStateDict | None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Complete a step directory whose weights (``model.safetensors``) are written: add
    ``trainer_state.pt`` by rename, then keep only the newest ``keep`` step directories.
    ``optimizer`` None: its state is saved elsewhere (FSDP shards)."""
    directory = step_directory(run_dir, step)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": _rng_state(),
        "extra": extra or {},
        "time": time.time(),
    }
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.rename(directory / STATE_FILE)
    for old in _step_dirs(Path(run_dir))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved training state at step %d to %s", step, directory)
    return directory


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


def load_train_state(
    step_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Restore weights (strictly), optimizer and RNG from a step directory.

    Returns:
        ``{"step": int, "extra": dict}``.
    """
    from safetensors.torch import load_file

    from beit3.checkpoint import load_state_dict_checked

    step_dir = Path(step_dir)
    state = load_file(str(step_dir / "model.safetensors"))
    load_state_dict_checked(model, state, source=str(step_dir))
    saved = torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    _set_rng_state(saved["rng"])
    logger.info("resumed from %s (step %d)", step_dir, saved["step"])
    return {"step": int(saved["step"]), "extra": saved.get("extra", {})}


# Logs --------------------------------------------------------------------------------------


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_config(output_dir: str | Path, config: Any) -> Path:
    """Write ``run_config.json``: the resolved config (a dataclass), git SHA, package versions."""
    import beit3

    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    data = dataclasses.asdict(config) if is_instance else dict(config)
    record = {
        "config": data,
        "git_sha": _git_sha(),
        "versions": {
            "beit3": beit3.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    path = Path(output_dir) / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


class RunLogger:
    """Rank-0 logging of training metrics: one ``key=value`` line every ``log_every`` steps,
    every logged step appended to ``metrics.jsonl``, and TensorBoard scalars when available."""

    def __init__(
        self,
        output_dir: str | Path,
        is_main: bool = True,
        log_every: int = 10,
        tensorboard: bool = True,
    ) -> None:
        self.is_main = is_main
        self.log_every = max(1, log_every)
        self.path = Path(output_dir) / "metrics.jsonl"
        self.start = time.monotonic()
        self.writer = None
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
                except ImportError:
                    logger.warning(
                        "tensorboard is not installed: pip install tensorboard "
                        "(metrics still go to %s)",
                        self.path,
                    )

    def should_log(self, step: int) -> bool:
        return self.is_main and step % self.log_every == 0

    def log(self, step: int, force: bool = False, **metrics: float) -> None:
        if not self.is_main or not (force or step % self.log_every == 0):
            return
        record = {"step": step, "elapsed_s": round(time.monotonic() - self.start, 3)}
        record.update({k: float(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, float(value), step)
        logger.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def truncate_metrics(out: str | Path, step: int) -> None:
    """Drop records after ``step`` from metrics.jsonl, so a resumed run's log reads as one run."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(output_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The records of ``metrics.jsonl``."""
    path = Path(output_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)
