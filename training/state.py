"""Where a fine-tuning run starts, and writing its models.

Step checkpoints (one layout for one process, DDP and FSDP) and resume come from
:mod:`beit3.run.state`; this module adds what is specific to fine-tuning: the starting point of
a run and the export of the trained model as a plain checkpoint directory of the task's
architecture.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from beit3.checkpoint import save_state_checkpoint
from beit3.config import Beit3Config
from beit3.errors import ConfigError
from beit3.run import DistInfo, barrier, full_model_state
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig
from training.config import FinetuneConfig

__all__ = ["Start", "check_same_batches", "export_model"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Start:
    """Where a run starts: the model (of the task's architecture) and what goes with it."""

    model: nn.Module
    tokenizer: TextTokenizer
    preprocess: PreprocessConfig
    preset: str
    init_model_id: str | None
    export_config: Beit3Config  # the config written into final/ and best/ (no training knobs)


def check_same_batches(
    extra: dict[str, Any], config: FinetuneConfig, info: DistInfo, step_dir: Path
) -> None:
    """A resumed run must cut the data into the same batches as the run it continues."""
    saved = extra.get("batch", {})
    now = batch_identity(config, info)
    if saved and saved != now:
        raise ConfigError(
            f"{step_dir} was trained with {saved}, this run has {now}; the data position "
            "and schedule only carry over with the same batch size, processes, accumulation "
            "and batch building"
        )


def batch_identity(config: FinetuneConfig, info: DistInfo) -> dict[str, int]:
    """What cuts the data into a run's batches (saved with each step checkpoint)."""
    identity = {
        "batch_size": config.batch_size,
        "world_size": info.world_size,
        "accum_steps": config.accum_steps,
    }
    if config.neighbour_batches:  # absent from the checkpoints of random-batch runs
        identity["neighbour_batches"] = config.neighbour_batches
    return identity


def write_model(state: dict, start: Start, path: Path) -> None:
    """Write a full state dict as a checkpoint directory of the run's architecture (rank 0)."""
    save_state_checkpoint(
        start.model,
        state,
        path,
        preset=start.preset,
        tokenizer=start.tokenizer,
        preprocess=start.preprocess,
        config=start.export_config,
    )


def export_model(start: Start, path: Path, info: DistInfo) -> None:
    """Write the trained model as a plain checkpoint directory (a collective under FSDP)."""
    state = full_model_state(start.model)
    if info.is_main:
        write_model(state, start, path)
    barrier()
