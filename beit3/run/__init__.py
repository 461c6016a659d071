"""The run kit: what every trainer (fine-tuning, pretraining, the VQ-KD tokenizer) shares.

- :mod:`~beit3.run.process`: torchrun process group (the one ``init_process_group`` of the
  tree), device, collectives, per-rank RNG.
- :mod:`~beit3.run.precision`: the precision policy (one rule for bf16).
- :mod:`~beit3.run.optim`: AdamW with weight-decay and layer-decay groups, warmup + cosine.
- :mod:`~beit3.run.wrap`: DDP / FSDP2 wrapping (one option name, one size rule), full states.
- :mod:`~beit3.run.state`: step checkpoints (one layout, FSDP optimizer state included), resume.
- :mod:`~beit3.run.logs`: ``run_config.json``, ``metrics.jsonl``, TensorBoard.
- :mod:`~beit3.run.loop`: the loop itself; a trainer brings its data, model and step function.

Model code (``model.py``, ``heads.py``) never imports this package.
"""

from beit3.run.logs import RunLogger, read_metrics, truncate_metrics, write_run_config
from beit3.run.loop import LrSchedule, run_steps
from beit3.run.optim import (
    NO_WEIGHT_DECAY,
    build_adamw,
    clipped_step,
    cosine_lr,
    param_groups,
    set_lr,
)
from beit3.run.precision import PRECISIONS, autocast, resolve_bf16
from beit3.run.process import (
    DistInfo,
    all_mean,
    all_reduce_sum,
    barrier,
    destroy_process_group,
    gather_features,
    gather_rng_states,
    gather_rows,
    init_distributed,
    is_distributed,
    join_process_group,
    rank_rng_state,
    resolve_device,
    set_rank_rng_state,
    shard_range,
)
from beit3.run.state import (
    STATE_FILE,
    find_latest,
    load_step_weights,
    restore_step,
    resume_step_dir,
    save_step,
    step_directory,
)
from beit3.run.wrap import (
    STRATEGIES,
    choose_strategy,
    full_model_state,
    grad_sync,
    sync_unsharded_grads,
    wrap_model,
)

__all__ = [
    "NO_WEIGHT_DECAY",
    "PRECISIONS",
    "STATE_FILE",
    "STRATEGIES",
    "DistInfo",
    "LrSchedule",
    "RunLogger",
    "all_mean",
    "all_reduce_sum",
    "autocast",
    "barrier",
    "build_adamw",
    "choose_strategy",
    "clipped_step",
    "cosine_lr",
    "destroy_process_group",
    "find_latest",
    "full_model_state",
    "gather_features",
    "gather_rng_states",
    "gather_rows",
    "grad_sync",
    "init_distributed",
    "is_distributed",
    "join_process_group",
    "load_step_weights",
    "param_groups",
    "rank_rng_state",
    "read_metrics",
    "resolve_bf16",
    "resolve_device",
    "restore_step",
    "resume_step_dir",
    "run_steps",
    "save_step",
    "set_lr",
    "set_rank_rng_state",
    "shard_range",
    "step_directory",
    "sync_unsharded_grads",
    "truncate_metrics",
    "wrap_model",
    "write_run_config",
]
