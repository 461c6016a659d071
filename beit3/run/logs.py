"""Run logs: the resolved run config, ``metrics.jsonl`` and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunLogger", "read_metrics", "truncate_metrics", "write_run_config"]

logger = logging.getLogger(__name__)


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

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
