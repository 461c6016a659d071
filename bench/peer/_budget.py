"""Wall-clock budgets for the peer benchmark's trainers (stdlib only: both venvs import it).

A run is a trainer's own command line, started in its own process group and stopped at the
deadline (SIGTERM, then SIGKILL after a grace period); the caller then takes the newest checkpoint
the trainer saved. Its schedule length comes from a short calibration run of the same command:
``plan_steps`` turns (calibration wall time, steps, seconds per step) into the number of steps
that ends a little before the budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# The schedule aims at this fraction of the budget; the deadline is the budget itself.
TARGET_FRACTION = 0.97
KILL_GRACE_S = 10.0


def peer_env() -> dict[str, str]:
    """The environment for every run: passive OpenMP waits (environment.md: busy-waiting threads
    make small ops ~100x slower on this 2-core box) and an offline hub."""
    env = dict(os.environ)
    env.update(OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@dataclass(frozen=True)
class RunResult:
    command: list[str]
    wall_s: float
    returncode: int | None  # None when it was stopped at the deadline
    stopped_at_deadline: bool
    log: str

    def to_dict(self) -> dict:
        return asdict(self)


def run_with_deadline(
    command: list[str], deadline_s: float, log_path: Path, cwd: Path | None = None
) -> RunResult:
    """Run ``command`` (stdout and stderr to ``log_path``) for at most ``deadline_s`` seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=peer_env(),
            start_new_session=True,  # its own process group: the DataLoader workers go too
        )
        try:
            returncode: int | None = proc.wait(timeout=deadline_s)
            stopped = False
        except subprocess.TimeoutExpired:
            stopped, returncode = True, None
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - start
    with log_path.open("a") as log:
        log.write(
            f"\n# wall {wall:.1f} s, "
            + ("stopped at the deadline" if stopped else f"exit {returncode}")
            + "\n"
        )
    return RunResult(command, round(wall, 2), returncode, stopped, str(log_path))


def plan_steps(
    budget_s: float, calibration_wall_s: float, calibration_steps: int, step_s: float
) -> dict:
    """Steps that fit the budget: the calibration's fixed cost (start-up, saving, exit: its wall
    time minus its steps) plus ``steps x step_s``, aimed at TARGET_FRACTION of the budget."""
    overhead = max(0.0, calibration_wall_s - calibration_steps * step_s)
    steps = int((TARGET_FRACTION * budget_s - overhead) / step_s)
    return {
        "budget_s": budget_s,
        "calibration_wall_s": round(calibration_wall_s, 2),
        "calibration_steps": calibration_steps,
        "step_s": round(step_s, 4),
        "overhead_s": round(overhead, 2),
        "steps": max(1, steps),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def test_pairs(rows: list[dict]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Images (in order), distinct captions (in order of first use) and (image, caption) pairs of
    test rows ``{"image", "text"}``: each distinct caption is encoded once."""
    images: list[str] = []
    texts: list[str] = []
    text_index: dict[str, int] = {}
    pairs = []
    for row in rows:
        images.append(row["image"])
        if row["text"] not in text_index:
            text_index[row["text"]] = len(texts)
            texts.append(row["text"])
        pairs.append((len(images) - 1, text_index[row["text"]]))
    return images, texts, pairs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
