"""`beit3 improve` and `beit3 feedback list|export|clear` (registered by app.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

_DB = typer.Option("--db", exists=True, file_okay=False, help="Index directory.")


def register(cli: typer.Typer) -> None:
    """Add ``improve`` and the ``feedback`` group to ``cli``."""
    feedback_cli = typer.Typer(
        help="Relevance feedback stored in an index: list, export as training pairs, clear.",
        no_args_is_help=True,
    )
    cli.add_typer(feedback_cli, name="feedback")

    @feedback_cli.command("list")
    def list_cmd(
        db: Annotated[Path, _DB],
        table: Annotated[
            str | None, typer.Option(help="Only labels of hits of this table.")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines on stdout.")] = False,
    ) -> None:
        """List the labels: +/- hit (table), query, model, time."""
        import dataclasses

        from indexer.feedback import FeedbackStore

        labels = FeedbackStore(db).labels(hit_table=table)
        for row in labels:
            if as_json:
                typer.echo(json.dumps(dataclasses.asdict(row)))
                continue
            hit = row.hit_path or (row.hit_text or "")[:60] or row.hit_id[:12]
            typer.echo(
                f"{'+' if row.label > 0 else '-'} {row.hit_table}:{hit}  <- {row.query!r}  "
                f"{row.model_id} {row.version or ''} {row.created}"
            )
        if not as_json:
            typer.echo(f"{len(labels)} labels in {db}", err=True)

    @feedback_cli.command("export")
    def export_cmd(
        db: Annotated[Path, _DB],
        output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="JSONL.")],
        table: Annotated[
            str | None, typer.Option(help="Only labels of hits of this table.")
        ] = None,
    ) -> None:
        """Write the labels as training pairs with hard negatives (JSONL for beit3 finetune)."""
        from indexer.feedback import FeedbackStore

        typer.echo(FeedbackStore(db).export(output, hit_table=table).line())

    @feedback_cli.command("clear")
    def clear_cmd(
        db: Annotated[Path, _DB],
        table: Annotated[
            str | None, typer.Option(help="Only labels of hits of this table.")
        ] = None,
        yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    ) -> None:
        """Delete the labels (of one table)."""
        from indexer.feedback import FeedbackStore

        store = FeedbackStore(db)
        what = f"the {store.count(table)} labels" + (f" of table {table!r}" if table else "")
        if not yes and not typer.confirm(f"delete {what} in {db}?"):
            raise typer.Abort()
        typer.echo(f"deleted {store.clear(table)} labels")

    @cli.command()
    def improve(
        db: Annotated[Path, _DB],
        held_out: Annotated[
            Path,
            typer.Option(exists=True, help="Held-out pairs: the gate (never trained on)."),
        ],
        output: Annotated[Path, typer.Option(file_okay=False, help="Run directory (resumable).")],
        table: Annotated[str, typer.Option(help="Image table to improve.")] = "images",
        train: Annotated[
            Path | None,
            typer.Option(exists=True, help="Original training pairs, mixed in (no forgetting)."),
        ] = None,
        source: Annotated[
            list[Path] | None,
            typer.Option(
                "--source",
                exists=True,
                help="Index the new version from these (repeatable); default: the active "
                "version's files. Give the original manifest to keep its captions.",
            ),
        ] = None,
        steps: Annotated[int, typer.Option(help="Fine-tuning steps.")] = 30,
        batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 32,
        lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
        feedback_fraction: Annotated[
            float, typer.Option(help="Share of the training rows that are feedback.")
        ] = 0.2,
        max_drop: Annotated[
            float,
            typer.Option(help="Refuse when held-out mean recall drops more (points)."),
        ] = 1.0,
        activate: Annotated[bool, typer.Option(help="Activate the new version at the end.")] = True,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
        seed: Annotated[int, typer.Option(help="Data order seed.")] = 0,
    ) -> None:
        """Fine-tune the active model on the feedback, check it on held-out pairs, index and
        activate it (every stage resumable: run it again to continue)."""
        from app.cli_index import progress_bars
        from app.improve import ImproveConfig
        from app.improve import improve as run_improve

        config = ImproveConfig(
            db=str(db),
            output_dir=str(output),
            held_out=str(held_out),
            table=table,
            train=str(train) if train else None,
            sources=tuple(str(s) for s in source or ()),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            feedback_fraction=feedback_fraction,
            max_drop=max_drop,
            activate=activate,
            device=device,
            seed=seed,
        )
        progress, close = progress_bars()
        try:
            report = run_improve(config, progress=progress)
        finally:
            close()
        for line in report.lines():
            typer.echo(line)
