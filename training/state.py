"""Run state of fine-tuning: where a run starts, resuming it, and writing checkpoints.

A step checkpoint is ``output_dir/checkpoints/step-N/``: a checkpoint directory plus
``trainer_state.pt`` (step, optimizer, RNG, data position; written last, so its presence marks a
complete step) in the layout of :func:`beit3.runtime.save_train_state`. Under FSDP the optimizer
state is sharded in ``optimizer-dcp/`` (torch.distributed.checkpoint) instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from beit3.checkpoint import load_state_dict_checked, save_checkpoint
from beit3.config import Beit3Config
from beit3.errors import ConfigError
from beit3.heads import Beit3ForRetrieval
from beit3.runtime import (
    STATE_FILE,
    DistInfo,
    finish_step_directory,
    load_train_state,
    set_rank_rng_state,
    step_directory,
)
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig
from training.config import FinetuneConfig
from training.distributed import barrier, full_state_dict

__all__ = [
    "Start",
    "check_same_batches",
    "export_model",
    "read_weights",
    "restore",
    "save_fsdp_state",
]

logger = logging.getLogger(__name__)

OPTIMIZER_DIR = "optimizer-dcp"  # FSDP: the sharded optimizer state (torch.distributed.checkpoint)


@dataclasses.dataclass
class Start:
    """Where a run starts: the model and what goes with it."""

    model: Beit3ForRetrieval
    tokenizer: TextTokenizer
    preprocess: PreprocessConfig
    preset: str
    init_model_id: str | None
    export_config: Beit3Config  # the config written into final/ and best/ (no training knobs)


def read_weights(step_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(step_dir / "model.safetensors"))


def restore(
    step_dir: Path,
    model: nn.Module,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy: str,
    info: DistInfo,
) -> dict[str, Any]:
    """Optimizer, step, RNG and the saved extras of a step directory (weights are in already)."""
    saved = torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=True)
    extra = saved.get("extra", {})
    saved_strategy = extra.get("strategy", "none")
    if (saved_strategy == "fsdp") != (strategy == "fsdp"):
        raise ConfigError(
            f"{step_dir} was written by a {saved_strategy} run; resume it with "
            f"the same strategy (this run: {strategy})"
        )
    if strategy == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = {"optimizer": get_optimizer_state_dict(wrapped, optimizer)}
        dcp.load(state, checkpoint_id=str(step_dir / OPTIMIZER_DIR))
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"])
    else:
        load_train_state(step_dir, model, optimizer)
    rng = extra.get("rank_rng") or []
    if len(rng) == info.world_size:
        set_rank_rng_state(rng, info.rank)
    return {
        **extra,
        "step": int(saved["step"]),
        "best": extra.get("best", {"average": -math.inf, "step": 0}),
    }


def check_same_batches(
    extra: dict[str, Any], config: FinetuneConfig, info: DistInfo, step_dir: Path
) -> None:
    saved = extra.get("batch", {})
    now = {
        "batch_size": config.batch_size,
        "world_size": info.world_size,
        "accum_steps": config.accum_steps,
    }
    if saved and saved != now:
        raise ConfigError(
            f"{step_dir} was trained with {saved}, this run has {now}; the data position "
            "and schedule only carry over with the same batch size, processes and accumulation"
        )


def export_model(
    wrapped: nn.Module, strategy: str, start: Start, path: Path, info: DistInfo
) -> None:
    """Write the model as a plain checkpoint directory (collective under FSDP)."""
    state = full_state_dict(wrapped, strategy)
    if info.is_main:
        with torch.device("meta"):
            clean = Beit3ForRetrieval(start.export_config)
        load_state_dict_checked(
            clean, state, source="the trained model", preset=start.preset, assign=True
        )
        save_checkpoint(
            clean, path, preset=start.preset, tokenizer=start.tokenizer, preprocess=start.preprocess
        )
    barrier(info)


def save_fsdp_state(
    out: Path,
    step: int,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    start: Start,
    extra: dict[str, Any],
    keep: int,
    info: DistInfo,
) -> None:
    """FSDP version of ``beit3.runtime.save_train_state``: same layout, the optimizer state
    sharded in ``optimizer-dcp/`` (each rank writes its shard); ``trainer_state.pt`` last."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    directory = step_directory(out, step)
    export_model(wrapped, "fsdp", start, directory, info)
    dcp.save(
        {"optimizer": get_optimizer_state_dict(wrapped, optimizer)},
        checkpoint_id=str(directory / OPTIMIZER_DIR),
    )
    barrier(info)
    if info.is_main:
        finish_step_directory(out, step, optimizer=None, extra=extra, keep=keep)
