"""The training loop every trainer runs: learning rate, step, logs, evaluation, checkpoints.

A trainer brings its step function (one optimizer step on its own data and model) and its
duties at log, evaluation and save steps; the loop owns the order and the schedule::

    lr = warmup + cosine(step - 1)  ->  step_fn(step)  ->  on_log  ->  after_step  ->  on_save

with ``step`` counted from 1, logs every ``log_every`` steps and checkpoints every
``save_every`` steps, both also at the last step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from beit3.run.optim import cosine_lr, set_lr

__all__ = ["LrSchedule", "run_steps"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LrSchedule:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``total_steps``."""

    total_steps: int
    warmup_steps: int
    lr: float
    min_lr: float = 0.0

    def at(self, step: int) -> float:
        """The lr of the step that follows ``step`` completed steps."""
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr)


def run_steps(
    start_step: int,
    schedule: LrSchedule,
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[int], None],
    *,
    log_every: int,
    save_every: int,
    on_log: Callable[[int, float], None],
    on_save: Callable[[int], None],
    after_step: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> int:
    """Run steps ``start_step + 1 .. schedule.total_steps``; returns the last step.

    Args:
        step_fn: takes step ``n`` (1-based): forward, backward, optimizer step.
        on_log: ``(step, lr)`` at log steps (read metrics to the host only here).
        on_save: ``step`` at checkpoint steps (a collective when distributed).
        after_step: ``step`` after every step (e.g. a periodic evaluation).
        progress: ``(step, total_steps)`` after every step.
    """
    total = schedule.total_steps
    step = start_step
    while step < total:
        lr = schedule.at(step)
        set_lr(optimizer, lr)
        step += 1
        step_fn(step)
        last = step == total
        if step % log_every == 0 or last:
            on_log(step, lr)
        if after_step is not None:
            after_step(step)
        if step % save_every == 0 or last:
            on_save(step)
        if progress is not None:
            progress(step, total)
    return step
