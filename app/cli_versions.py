"""`beit3 versions`: the model versions of an index's tables (registered by app.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

_DB = typer.Option("--db", file_okay=False, exists=True, help="Index directory.")


def _metric_summary(metrics: dict | None) -> str:
    """The held-out figure a checkpoint's metrics.json records, when it has one (the demo
    recipe writes per-split recall, ``beit3 improve`` its held-out mean recall)."""
    if not metrics:
        return ""
    if isinstance(metrics.get("mean_recall"), int | float):
        return f"held-out mean recall {metrics['mean_recall']:.1f}"
    split = (metrics.get("splits") or {}).get("test") or metrics.get("test")
    if isinstance(split, dict):
        value = split.get("average", split.get("mean"))
        if isinstance(value, int | float):
            return f"test mean recall {value:.1f}"
    return ""


def register(cli: typer.Typer) -> None:
    """Add ``versions`` (list), ``versions activate`` and ``versions remove`` to ``cli``."""
    versions_cli = typer.Typer(
        help="Model versions of the tables of an index: list, activate, remove."
    )
    cli.add_typer(versions_cli, name="versions")

    @versions_cli.callback(invoke_without_command=True)
    def list_cmd(
        ctx: typer.Context,
        db: Annotated[Path | None, _DB] = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
    ) -> None:
        """List the versions (the active one marked *): model, items, created, metrics."""
        if ctx.invoked_subcommand is not None:
            return
        if db is None:
            raise typer.BadParameter("give the index directory: beit3 versions --db DIR")
        from indexer import list_versions

        versions = list_versions(db)
        if as_json:
            typer.echo(json.dumps([v.to_dict() for v in versions], indent=2))
            return
        for v in versions:
            items = f"{v.items:,} items" if v.items is not None else "building"
            extra = _metric_summary(v.metrics)
            typer.echo(
                f"{'*' if v.active else ' '} {v.id:<4} {v.table:<12} {v.model_id:<28} "
                f"{v.encoder:<5} {items:<14} created {v.created}" + (f"  {extra}" if extra else "")
            )

    @versions_cli.command("activate")
    def activate_cmd(
        version: Annotated[str, typer.Argument(help="Version id, e.g. v2.")],
        db: Annotated[Path, _DB],
    ) -> None:
        """Make VERSION the one its table's searches use (atomic; running servers follow)."""
        from indexer import activate_version

        info = activate_version(db, version)
        typer.echo(f"table {info.table!r} now searches version {info.id} ({info.model_id})")

    @versions_cli.command("remove")
    def remove_cmd(
        version: Annotated[str, typer.Argument(help="Version id, e.g. v1 (not the active one).")],
        db: Annotated[Path, _DB],
    ) -> None:
        """Delete a version that is not active, with its vectors."""
        from indexer import remove_version

        remove_version(db, version)
        typer.echo(f"removed version {version} from {db}")
