"""`beit3` subcommands for app (registered by app.cli)."""

from __future__ import annotations

import typer


def register(cli: typer.Typer) -> None:
    """Add this module's commands to ``cli``."""
