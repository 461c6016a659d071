"""The loop from feedback to a better model: ``beit3 improve --db DIR``.

Stages, each recorded in ``output_dir/improve.json`` when it finishes, so a re-run skips what
is done (and an interrupted fine-tune resumes from its last step checkpoint)::

    1 export     the table's feedback labels -> feedback.jsonl (pairs + hard negatives), mixed
                 with the original training pairs (feedback rows repeated to a fixed share)
                 -> train.jsonl; the active version (model, checkpoint) is fixed here
    2 baseline   recall@1/5/10 of the active model on the held-out pairs (training.evaluate)
    3 finetune   training.finetune from the active checkpoint on train.jsonl
    4 evaluate   the same recall of the new model; refused (nothing indexed) when its mean
                 recall is more than ``max_drop`` points below the baseline's
    5 index      the new model copied into <db>/models/, and a new version of the table built
                 beside the active one from the same files (indexer.index_images); the active
                 version keeps serving meanwhile
    6 activate   the new version becomes the active one (one atomic manifest write)

The figures are points of mean recall (the average of i2t / t2i R@1, R@5, R@10, x 100), as
``training.evaluate`` and ``demo/measure_model.py`` compute them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beit3.errors import Beit3Error, ConfigError, InputDataError

__all__ = ["STAGES", "ImproveConfig", "ImproveRefused", "ImproveReport", "improve"]

logger = logging.getLogger(__name__)

STAGES = ("export", "baseline", "finetune", "evaluate", "index", "activate")
STATE_NAME = "improve.json"
# Fields that do not change what the stages compute: a re-run may change them.
_FREE_FIELDS = ("max_drop", "activate", "device", "num_workers")

ProgressFn = Callable[[str, int, int], None]


class ImproveRefused(Beit3Error):
    """The new model is worse on the held-out pairs than the active one by more than allowed."""


@dataclass(frozen=True, kw_only=True)
class ImproveConfig:
    """One improve run.

    Attributes:
        db: the database directory (its ``feedback.sqlite3`` holds the labels).
        output_dir: the run's working directory (resumable; one run per directory).
        held_out: pairs (.jsonl/.csv/caption folder) that decide whether the new model may
            serve: never train on them.
        table: the image table whose feedback trains and which gets the new version.
        train: the original training pairs, mixed in against forgetting (recommended).
        sources: what the new version indexes (folders, files or manifests, as for
            ``beit3 index images``); default: every file of the active version. Give the
            original manifest to keep its labels (captions) for keyword search.
        steps, batch_size, lr, warmup_steps: the fine-tune (no drop path, no layer decay, mild
            crops: short runs from a fine-tuned model, as the demo recipe's refine stage).
        feedback_fraction: the share of train.jsonl rows that are feedback rows (they are
            repeated to reach it; with no ``train``, feedback rows only).
        max_negatives: hard negatives per text (training.FinetuneConfig.max_negatives).
        max_drop: the largest allowed drop of held-out mean recall, in points.
        activate: make the new version active at the end (else it is built and left inactive).
    """

    db: str
    output_dir: str
    held_out: str
    table: str = "images"
    train: str | None = None
    sources: tuple[str, ...] = ()
    steps: int = 30  # demo/improve_loop.py: 60 steps cost R@1 1.6 points, 30 kept it within 1
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int | None = None
    feedback_fraction: float = 0.2
    max_negatives: int = 8
    max_drop: float = 1.0
    seed: int = 0
    activate: bool = True
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.feedback_fraction <= 1:
            raise ConfigError(f"feedback_fraction must be in (0, 1], got {self.feedback_fraction}")
        if self.train is not None and Path(self.train).resolve() == Path(self.held_out).resolve():
            raise ConfigError(
                f"train and held_out are the same file ({self.held_out}); the gate needs pairs "
                "the model is not trained on"
            )
        if not math.isfinite(self.max_drop):
            raise ConfigError(f"max_drop must be a number of points, got {self.max_drop}")

    def signature(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in _FREE_FIELDS:
            data.pop(name)
        data["sources"] = list(self.sources)
        return data


@dataclass
class ImproveReport:
    """What a run did: per stage its wall time in seconds (``skipped``: done by an earlier run),
    the held-out mean recall before and after (points), the new version and model."""

    stages: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    feedback: str = ""
    train_rows: int = 0
    before: float | None = None
    after: float | None = None
    before_metrics: dict[str, Any] = field(default_factory=dict)
    after_metrics: dict[str, Any] = field(default_factory=dict)
    base_version: str = ""
    base_model_id: str = ""
    model_id: str = ""
    checkpoint: str = ""
    version: str = ""
    activated: bool = False

    def lines(self) -> list[str]:
        out = [
            f"{name:9s} {seconds:7.1f} s" + ("  (done before)" if name in self.skipped else "")
            for name, seconds in self.stages.items()
        ]
        if self.before is not None and self.after is not None:
            out.append(
                f"held-out mean recall {self.before:.1f} -> {self.after:.1f} "
                f"({self.after - self.before:+.1f} points)"
            )
        if self.version:
            state = "active" if self.activated else "built, not active"
            out.append(
                f"version {self.version} ({self.model_id}) {state}; was {self.base_version} "
                f"({self.base_model_id})"
            )
        return out


def improve(config: ImproveConfig, progress: ProgressFn | None = None) -> ImproveReport:
    """Run (or resume) the loop; see the module docstring for the stages.

    Args:
        config: the run.
        progress: ``progress(stage, done, total)`` for the fine-tune (steps) and the index
            (items).

    Returns:
        :class:`ImproveReport`.

    Raises:
        ImproveRefused: the new model's held-out mean recall fell by more than ``max_drop``.
        InputDataError, ConfigError: no usable feedback, a bad database or a run directory
            that holds another run.
    """
    run = _Run(config, progress)
    for stage in STAGES:
        if stage == "activate" and not config.activate:
            break
        run.stage(stage)
    return run.report


class _Run:
    def __init__(self, config: ImproveConfig, progress: ProgressFn | None) -> None:
        self.config, self.progress = config, progress
        self.db = Path(config.db)
        self.out = Path(config.output_dir)
        self.state_path = self.out / STATE_NAME
        self.report = ImproveReport()
        if not (self.db / "beit3_index.json").is_file():
            raise InputDataError(f"{config.db}: not a beit3 index (no beit3_index.json)")
        if not Path(config.held_out).exists():
            raise InputDataError(f"held-out pairs {config.held_out}: no such file or folder")
        self.state: dict[str, Any] = {"config": config.signature(), "stages": {}}
        if self.state_path.is_file():
            old = json.loads(self.state_path.read_text())
            changed = sorted(
                k
                for k in set(old["config"]) | set(config.signature())
                if old["config"].get(k) != config.signature().get(k)
            )
            if changed:
                raise ConfigError(
                    f"{self.out} holds an improve run with other settings ({', '.join(changed)}); "
                    "give a new --output, or the same settings to resume it"
                )
            self.state = old
        self.out.mkdir(parents=True, exist_ok=True)

    # -- bookkeeping ------------------------------------------------------------------------

    def stage(self, name: str) -> None:
        done = self.state["stages"].get(name)
        number = f"{STAGES.index(name) + 1}/{len(STAGES)}"
        if done is not None and "result" in done:
            logger.info(
                "stage %s %s: done in an earlier run (%.1f s)", number, name, done["seconds"]
            )
            self.report.skipped.append(name)
            self.report.stages[name] = done["seconds"]
            self._take(name, done["result"])
            if name == "evaluate" and "index" not in self.state["stages"]:
                self._gate()  # once the new version is built, the decision has been taken
            return
        logger.info("stage %s %s ...", number, name)
        started = time.monotonic()
        result = getattr(self, f"_{name}")()
        seconds = round(time.monotonic() - started, 2)
        self.state["stages"][name] = {"seconds": seconds, "result": result}
        self._save()
        self.report.stages[name] = seconds
        self._take(name, result)
        logger.info("stage %s %s: done in %.1f s", number, name, seconds)
        if name == "evaluate":
            self._gate()

    def _save(self) -> None:
        partial = self.state_path.with_name(f".{STATE_NAME}.partial")
        partial.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(partial, self.state_path)

    def _result(self, name: str) -> dict[str, Any]:
        return self.state["stages"][name]["result"]

    def _take(self, name: str, result: dict[str, Any]) -> None:
        r = self.report
        if name == "export":
            r.feedback, r.train_rows = result["feedback"], result["train_rows"]
            r.base_version, r.base_model_id = result["version"], result["model_id"]
        elif name == "baseline":
            r.before, r.before_metrics = result["mean_recall"], result["metrics"]
        elif name == "finetune":
            r.checkpoint, r.model_id = result["checkpoint"], result["model_id"]
        elif name == "evaluate":
            r.after, r.after_metrics = result["mean_recall"], result["metrics"]
        elif name == "index":
            r.version, r.checkpoint = result["version"], result["checkpoint"]
        elif name == "activate":
            r.activated = True

    # -- stages -----------------------------------------------------------------------------

    def _export(self) -> dict[str, Any]:
        from beit3.data import read_pairs
        from indexer.feedback import FeedbackStore
        from indexer.versions import list_versions

        config = self.config
        active = [v for v in list_versions(self.db) if v.table == config.table and v.active]
        if not active:
            tables = sorted({v.table for v in list_versions(self.db)})
            raise InputDataError(
                f"{self.db}: no active version of table {config.table!r} (tables: "
                f"{', '.join(tables) or 'none'})"
            )
        version = active[0]
        store = FeedbackStore(self.db)
        summary = store.export(self.out / "feedback.jsonl", hit_table=config.table)
        if summary.rows == 0:
            raise InputDataError(
                f"{self.db}: no usable feedback for table {config.table!r} "
                f"({store.count(config.table)} labels; {summary.line()}); mark relevant hits "
                "in the app (thumbs up) or with indexer.feedback.FeedbackStore.add"
            )
        rows = [json.loads(x) for x in summary.path.read_text().splitlines()]
        held = {p.image for p in read_pairs(config.held_out)}
        leaked = sum(
            r["image"] in held or any(n in held for n in r.get("negatives", ())) for r in rows
        )
        if leaked:
            logger.warning(
                "%d of %d feedback rows name images of the held-out pairs %s: the gate then "
                "measures them as trained; keep held-out images out of the feedback",
                leaked,
                len(rows),
                config.held_out,
            )
        original = []
        if config.train:
            original = [
                {"image": p.image, "text": p.text} for p in read_pairs(config.train)
            ]  # absolute paths: the mixed manifest lives elsewhere
        if original:
            share = config.feedback_fraction
            repeat = max(1, round(share * len(original) / ((1 - share) * len(rows))))
        else:
            repeat = max(1, math.ceil(config.batch_size / len(rows)))
        mixed = rows * repeat + original
        train = self.out / "train.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in mixed))
        logger.info(
            "%s; train.jsonl: %d feedback rows x %d + %d original pairs",
            summary.line(),
            len(rows),
            repeat,
            len(original),
        )
        return {
            "feedback": summary.line(),
            "feedback_rows": len(rows),
            "repeat": repeat,
            "train_rows": len(mixed),
            "version": version.id,
            "model_id": version.model_id,
            "checkpoint": str(version.checkpoint),
        }

    def _evaluate_checkpoint(self, checkpoint: str, directory: str) -> dict[str, Any]:
        from training import EvalConfig, evaluate

        metrics = evaluate(
            EvalConfig(
                checkpoint=checkpoint,
                data=self.config.held_out,
                output_dir=str(self.out / directory),
                device=self.config.device,
                num_workers=self.config.num_workers,
            )
        )
        keep = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
        return {"mean_recall": round(100 * float(metrics["average"]), 2), "metrics": keep}

    def _baseline(self) -> dict[str, Any]:
        return self._evaluate_checkpoint(self._result("export")["checkpoint"], "eval-before")

    def _finetune(self) -> dict[str, Any]:
        from beit3 import load_checkpoint
        from training import FinetuneConfig, finetune

        config = self.config
        warmup = config.warmup_steps if config.warmup_steps is not None else config.steps // 10
        run = FinetuneConfig(
            train=str(self.out / "train.jsonl"),
            output_dir=str(self.out / "finetune"),
            init=self._result("export")["checkpoint"],
            max_steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            min_lr=min(1e-6, config.lr),
            warmup_steps=warmup,
            weight_decay=0.05,
            layer_decay=1.0,
            drop_path_rate=0.0,
            crop_scale=(0.9, 1.0),
            hflip=0.0,
            max_negatives=config.max_negatives,
            seed=config.seed,
            device=config.device,
            num_workers=config.num_workers,
            log_every=max(1, min(10, config.steps // 5)),
            save_every=max(1, config.steps // 3),
            keep_checkpoints=1,
            tensorboard=False,
            resume="latest",
        )
        step_progress = None
        if self.progress is not None:
            progress = self.progress
            step_progress = lambda done, total: progress("finetune", done, total)  # noqa: E731
        final = finetune(run, progress=step_progress)
        return {"checkpoint": str(final), "model_id": load_checkpoint(final).model_id}

    def _evaluate(self) -> dict[str, Any]:
        return self._evaluate_checkpoint(self._result("finetune")["checkpoint"], "eval-after")

    def _gate(self) -> None:
        before, after = self.report.before, self.report.after
        assert before is not None and after is not None, "the gate runs after both evaluations"
        if after < before - self.config.max_drop:
            raise ImproveRefused(
                f"refused: held-out mean recall on {self.config.held_out} went "
                f"{before:.1f} -> {after:.1f} ({after - before:+.1f} points; --max-drop "
                f"{self.config.max_drop:g} allows {before - self.config.max_drop:.1f}); "
                f"nothing was indexed; the model is in {self._result('finetune')['checkpoint']}"
            )

    def _index(self) -> dict[str, Any]:
        from indexer import index_images
        from indexer.versions import version_paths

        config = self.config
        exported = self._result("export")
        home = self._model_home()
        sources: list[str] = list(config.sources) or version_paths(self.db, exported["version"])
        item_progress = None
        if self.progress is not None:
            progress = self.progress
            item_progress = lambda stage, done, total: progress(f"index {stage}", done, total)  # noqa: E731
        report = index_images(
            sources,
            self.db,
            model=home,
            table=config.table,
            device=config.device,
            num_workers=config.num_workers,
            progress=item_progress,
            activate=False,
        )
        logger.info("%s", report)
        if not report.version or report.version == exported["version"]:
            raise InputDataError(
                f"indexing {config.table!r} with {home} wrote version {report.version!r}, not a "
                f"new one beside {exported['version']}"
            )
        return {"version": report.version, "checkpoint": str(home), "report": str(report)}

    def _model_home(self) -> Path:
        """The new model, copied into ``<db>/models/<model id>`` (the database then holds every
        checkpoint its versions need, and the run directory may be deleted), with the held-out
        figures as its ``metrics.json`` (``beit3 versions`` shows them)."""
        finetuned = self._result("finetune")
        home = self.db / "models" / re.sub(r"[^A-Za-z0-9_.-]", "-", finetuned["model_id"])
        if not (home / "model.safetensors").is_file():
            partial = home.with_name(f".{home.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(finetuned["checkpoint"], partial)
            os.replace(partial, home)
        after = self._result("evaluate")
        metrics = {
            "mean_recall": after["mean_recall"],
            "held_out": {**after["metrics"], "data": str(Path(self.config.held_out).resolve())},
            "baseline": {
                "model_id": self._result("export")["model_id"],
                "mean_recall": self._result("baseline")["mean_recall"],
            },
            "improve": {"output_dir": str(self.out.resolve()), **self.config.signature()},
        }
        (home / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return home

    def _activate(self) -> dict[str, Any]:
        from indexer.versions import activate_version

        info = activate_version(self.db, self._result("index")["version"])
        return {"version": info.id, "model_id": info.model_id}
