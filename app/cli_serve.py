"""`beit3 serve`: the HTTP search service (registered by app.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app._ui import DEFAULT_MAX_UPLOAD_MB  # one upload limit for the app and the service


def register(cli: typer.Typer) -> None:
    """Add ``serve`` to ``cli``."""

    @cli.command("serve")
    def serve_command(
        db: Annotated[
            Path,
            typer.Option(
                metavar="DIR", exists=True, file_okay=False, help="Index written by beit3 index."
            ),
        ],
        host: Annotated[
            str, typer.Option(metavar="ADDR", help="Address to bind; others need --token.")
        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(metavar="PORT", min=1, max=65535)] = 8000,
        token: Annotated[
            str | None,
            typer.Option(
                envvar="BEIT3_TOKEN",
                metavar="TOKEN",
                help="Bearer token every request must send (or set BEIT3_TOKEN).",
            ),
        ] = None,
        model: Annotated[
            Path | None,
            typer.Option(
                metavar="CKPT",
                exists=True,
                file_okay=False,
                help="Checkpoint dir for queries; default: the one the index records.",
            ),
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
        max_upload_mb: Annotated[
            int, typer.Option(metavar="MB", min=1, max=1024, help="Largest image upload, in MB.")
        ] = DEFAULT_MAX_UPLOAD_MB,
        access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
    ) -> None:
        """Serve an index over HTTP (JSON API, OpenAPI docs at /docs, Prometheus /metrics)."""
        from app.serve import run_server

        run_server(
            db,
            host=host,
            port=port,
            token=token,
            model=model,
            device=device,
            max_upload_mb=max_upload_mb,
            access_log=access_log,
            on_ready=lambda url: typer.echo(
                f"beit3 serve: {url}  (docs {url}/docs; {db}; Ctrl+C stops)", err=True
            ),
        )
