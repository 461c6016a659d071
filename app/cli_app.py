"""`beit3 app`: serve the Streamlit search page (registered by app.cli)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from app._ui import DEFAULT_MAX_UPLOAD_MB

APP_FILE = Path(__file__).with_name("streamlit_app.py")


def streamlit_command(dbs: list[Path], *, host: str = "127.0.0.1", port: int = 8501,
                      model: Path | None = None,
                      max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB) -> list[str]:
    """The ``streamlit run`` command line for the packaged page (headless, no telemetry)."""
    page_args = [arg for db in dbs for arg in ("--db", str(db))]
    if model is not None:
        page_args += ["--model", str(model)]
    page_args += ["--max-upload-mb", str(max_upload_mb)]
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_FILE),
        "--server.headless", "true",
        "--server.address", host,
        "--server.port", str(port),
        "--server.maxUploadSize", str(max_upload_mb),
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--client.showErrorDetails", "none",  # the page reports errors itself; never a traceback
        "--theme.base", "light",
        "--", *page_args,
    ]


def register(cli: typer.Typer) -> None:
    """Add this module's commands to ``cli``."""

    @cli.command("app")
    def app_command(
        db: Annotated[list[Path], typer.Option(
            metavar="DIR", exists=True, file_okay=False, help="Index folder written by `beit3 index`; repeat "
            "to offer several in the sidebar.")],
        port: Annotated[int, typer.Option(metavar="PORT", min=1, max=65535, help="Port to serve on.")] = 8501,
        host: Annotated[str, typer.Option(
            metavar="ADDR", help="Address to bind; 0.0.0.0 serves the whole network.")] = "127.0.0.1",
        model: Annotated[Path | None, typer.Option(
            metavar="CKPT", exists=True, file_okay=False,
            help="Checkpoint dir for queries; default: the one the index records.")] = None,
        max_upload_mb: Annotated[int, typer.Option(
            metavar="MB", min=1, max=1024, help="Largest image a visitor may upload, in MB.")] = (
            DEFAULT_MAX_UPLOAD_MB),
    ) -> None:
        """Serve the search app: type a description or drop an image, get images and texts."""
        import subprocess

        command = streamlit_command(db, host=host, port=port, model=model,
                                    max_upload_mb=max_upload_mb)
        typer.echo(f"beit3 app: http://{host}:{port}  ({', '.join(map(str, db))}; Ctrl+C stops)")
        try:
            status = subprocess.call(command)
        except KeyboardInterrupt:
            status = 0
        raise typer.Exit(status)
