"""`beit3 finetune` and `beit3 eval` (registered by app.cli). Under torchrun:
``torchrun --nproc-per-node 8 -m app.cli finetune ...``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

_Data = Annotated[
    Path,
    typer.Argument(
        exists=True,
        help="Pairs: .jsonl/.csv manifest or a folder of images with .txt captions "
        "(finetune also takes WebDataset .tar shards).",
    ),
]


@contextlib.contextmanager
def _progress(description: str, unit: str) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar on the main process, driven by the library's progress(done, total); log lines
    print above it."""
    if not _is_main():
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bars: list = []

    def update(done: int, total: int) -> None:
        if not bars:  # a resumed run starts part-way
            bars.append(
                tqdm(total=total, initial=done - 1, desc=description, unit=unit, dynamic_ncols=True)
            )
        bars[0].update(done - bars[0].n)

    try:
        with logging_redirect_tqdm():
            yield update
    finally:
        if bars:
            bars[0].close()


def register(cli: typer.Typer) -> None:
    """Add ``finetune`` and ``eval`` to ``cli``."""

    @cli.command()
    def finetune(
        train: Annotated[
            str,
            typer.Argument(
                help="Training pairs: .jsonl/.csv manifest, a "
                "folder of images with .txt captions, or WebDataset "
                "shards (x.tar, a folder of .tar, s-{000..009}.tar)."
            ),
        ],
        output_dir: Annotated[Path, typer.Option(file_okay=False, help="Run directory.")],
        init: Annotated[
            Path | None,
            typer.Option(exists=True, file_okay=False, help="Checkpoint directory to start from."),
        ] = None,
        preset: Annotated[
            str | None, typer.Option(help="Train from scratch (e.g. beit3-tiny).")
        ] = None,
        spm: Annotated[
            Path | None,
            typer.Option(
                exists=True,
                dir_okay=False,
                help=("Sentencepiece model for --preset; default: train one on the captions."),
            ),
        ] = None,
        val: Annotated[Path | None, typer.Option(exists=True, help="Held-out pairs.")] = None,
        epochs: float = 15.0,
        max_steps: Annotated[int | None, typer.Option(help="Overrides --epochs.")] = None,
        batch_size: Annotated[int, typer.Option(help="Pairs per process.")] = 64,
        accum_steps: int = 1,
        lr: float = 1e-4,
        layer_decay: Annotated[
            float | None, typer.Option(help="Default 0.65 from a checkpoint, 1 from scratch.")
        ] = None,
        weight_decay: float = 0.05,
        warmup_steps: Annotated[int | None, typer.Option(help="Default: 20% of steps.")] = None,
        drop_path: float = 0.2,
        grad_clip: Annotated[
            float | None,
            typer.Option(
                min=0.0,
                help="Clip the gradient norm to this (0: no clipping); default 0.3 from "
                "scratch, 0 from a checkpoint.",
            ),
        ] = None,
        crop_scale: Annotated[
            tuple[float, float],
            typer.Option(help="Random-resized-crop area range (e.g. 0.9 1.0 for mild crops)."),
        ] = (0.5, 1.0),
        hflip: Annotated[
            float,
            typer.Option(
                min=0.0, max=1.0, help="Horizontal-flip probability (0 for text, arrows)."
            ),
        ] = 0.5,
        temperature: Annotated[
            float | None,
            typer.Option(
                help="Start the contrastive temperature here (e.g. 0.02); default: the "
                "checkpoint's (0.07 from scratch)."
            ),
        ] = None,
        neighbour_batches: Annotated[
            int,
            typer.Option(
                min=0,
                help="Build batches from groups of this many pairs the start model finds alike "
                "(each pair with its nearest pairs of other images), so the loss meets near "
                "duplicates; 0: random batches.",
            ),
        ] = 0,
        img_size: Annotated[
            int | None,
            typer.Option(
                help="Image size: of a model from scratch; from --init, fine-tune at this size "
                "(the position table resized, e.g. 48 -> 64)."
            ),
        ] = None,
        precision: Annotated[str, typer.Option(help="auto | bf16 | fp32")] = "auto",
        activation_checkpointing: bool = False,
        strategy: Annotated[str, typer.Option(help="auto | ddp | fsdp (under torchrun)")] = "auto",
        save_every: int = 1000,
        eval_every: Annotated[int | None, typer.Option(help="Steps between --val evals.")] = None,
        log_every: int = 10,
        tensorboard: Annotated[
            bool, typer.Option(help="Also log to output_dir/tensorboard.")
        ] = True,
        num_workers: int = 4,
        seed: int = 42,
        resume: Annotated[str | None, typer.Option(help="'latest' or a step directory.")] = None,
        device: str = "auto",
        image_column: str | None = None,
        text_column: str | None = None,
        itm: Annotated[
            bool,
            typer.Option(
                "--itm",
                help="Also train the fusion-encoder matcher (image-text matching on hard "
                "negatives; calibrated on --val), for search --rerank.",
            ),
        ] = False,
        itm_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the --itm loss.")] = 1.0,
        itm_temperature: Annotated[
            tuple[float, float] | None,
            typer.Option(
                min=0.01,
                help="The matcher's negatives are drawn from softmax(similarity / T), T moving "
                "from the first value (easy negatives) to the second (the hardest) over the run. "
                "Default: 10 1.",
            ),
        ] = None,
        itm_only: Annotated[
            bool,
            typer.Option(
                "--itm-only",
                help="With --itm: train the matcher alone; the dual encoder stays as it is "
                "(its search results do not change).",
            ),
        ] = False,
    ) -> None:
        """Fine-tune on image-text pairs: the dual encoder (contrastive loss), with --itm the
        matcher too. With neither --init nor --preset it starts from the bundled demo model."""
        from app.demo import DEMO_MODEL
        from training import FinetuneConfig
        from training import finetune as run

        if init is None and preset is None:
            init = DEMO_MODEL
            typer.echo(f"starting from the bundled model {DEMO_MODEL} (--init/--preset to change)")
        config = FinetuneConfig(
            train=train,
            output_dir=str(output_dir),
            task="contrastive-itm" if itm else "contrastive",
            task_options=_itm_options(itm, itm_weight, itm_temperature, itm_only),
            init=_str(init),
            preset=preset,
            spm=_str(spm),
            val=_str(val),
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            accum_steps=accum_steps,
            lr=lr,
            layer_decay=layer_decay,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            drop_path_rate=drop_path,
            grad_clip=grad_clip,
            crop_scale=crop_scale,
            hflip=hflip,
            temperature=temperature,
            neighbour_batches=neighbour_batches,
            img_size=img_size,
            precision=precision,
            use_checkpoint=activation_checkpointing,
            strategy=strategy,
            save_every=save_every,
            eval_every=eval_every,
            log_every=log_every,
            tensorboard=tensorboard,
            num_workers=num_workers,
            seed=seed,
            resume=resume,
            device=device,
            image_column=image_column,
            text_column=text_column,
        )
        with _progress("finetune", "step") as update:
            final = run(config, progress=update)
        if _is_main():
            typer.echo(f"final model: {final}")

    @cli.command("eval")
    def evaluate(
        checkpoint: Annotated[
            Path, typer.Argument(exists=True, file_okay=False, help="Checkpoint directory.")
        ],
        data: _Data,
        output_dir: Annotated[
            Path | None, typer.Option(file_okay=False, help="Write metrics.json here.")
        ] = Path("."),
        batch_size: int = 64,
        num_workers: int = 2,
        precision: Annotated[str, typer.Option(help="auto | bf16 | fp32")] = "auto",
        device: str = "auto",
        image_column: str | None = None,
        text_column: str | None = None,
        rerank: Annotated[
            int,
            typer.Option(
                min=0,
                help="Also rerank the top N with the fusion encoder: recall with reranking, "
                "ECE and AUROC of the match probability, reliability.png (an --itm model).",
            ),
        ] = 0,
    ) -> None:
        """Image->text and text->image recall@1/5/10 of a checkpoint on held-out pairs."""
        from training import EvalConfig, format_table
        from training import evaluate as run

        config = EvalConfig(
            checkpoint=str(checkpoint),
            data=str(data),
            output_dir=_str(output_dir),
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
            device=device,
            image_column=image_column,
            text_column=text_column,
            rerank=rerank,
        )
        with _progress("eval", "batch") as update:
            metrics = run(config, progress=update)
        if _is_main():
            typer.echo(format_table(metrics))
            if output_dir is not None:
                typer.echo(f"wrote {output_dir / 'metrics.json'}")


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _itm_options(
    itm: bool, weight: float, temperature: tuple[float, float] | None, only: bool
) -> dict[str, float]:
    """The matching task's options from the --itm flags (the task's defaults where not given)."""
    if not itm:
        if only or temperature is not None:
            raise typer.BadParameter("--itm-only and --itm-temperature need --itm")
        return {}
    options = {"itm_weight": weight, "contrastive_weight": 0.0 if only else 1.0}
    if temperature is not None:
        options["itm_temperature"], options["itm_temperature_end"] = temperature
    return options


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
