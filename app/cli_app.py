"""`beit3 app`: serve the Streamlit search page (registered by app.cli)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from app._ui import DEFAULT_MAX_UPLOAD_MB

APP_FILE = Path(__file__).with_name("streamlit_app.py")


def streamlit_command(
    dbs: list[Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8501,
    model: Path | None = None,
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
) -> list[str]:
    """The ``streamlit run`` command line for the packaged page (headless, no telemetry)."""
    page_args = [arg for db in dbs for arg in ("--db", str(db))]
    if model is not None:
        page_args += ["--model", str(model)]
    page_args += ["--max-upload-mb", str(max_upload_mb)]
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_FILE),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.maxUploadSize",
        str(max_upload_mb),
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--client.showErrorDetails",
        "none",  # the page reports errors itself; never a traceback
        "--theme.base",
        "light",
        "--",
        *page_args,
    ]


def register(cli: typer.Typer) -> None:
    """Add this module's commands to ``cli``."""

    @cli.command("app")
    def app_command(
        db: Annotated[
            list[Path],
            typer.Option(
                metavar="DIR",
                exists=True,
                file_okay=False,
                help="Index folder written by `beit3 index`; repeat "
                "to offer several in the sidebar.",
            ),
        ],
        port: Annotated[
            int, typer.Option(metavar="PORT", min=1, max=65535, help="Port to serve on.")
        ] = 8501,
        host: Annotated[
            str,
            typer.Option(metavar="ADDR", help="Address to bind; 0.0.0.0 serves the whole network."),
        ] = "127.0.0.1",
        model: Annotated[
            Path | None,
            typer.Option(
                metavar="CKPT",
                exists=True,
                file_okay=False,
                help="Checkpoint dir for queries; default: the one the index records.",
            ),
        ] = None,
        max_upload_mb: Annotated[
            int,
            typer.Option(
                metavar="MB", min=1, max=1024, help="Largest image a visitor may upload, in MB."
            ),
        ] = (DEFAULT_MAX_UPLOAD_MB),
    ) -> None:
        """Serve the search app: type a description or drop an image, get images and texts."""
        command = streamlit_command(
            db, host=host, port=port, model=model, max_upload_mb=max_upload_mb
        )
        typer.echo(f"beit3 app: http://{host}:{port}  ({', '.join(map(str, db))}; Ctrl+C stops)")
        _serve(command)

    @cli.command("demo")
    def demo_command(
        db: Annotated[
            Path | None,
            typer.Option(
                metavar="DIR",
                file_okay=False,
                help="Where to build the demo index; default ~/.cache/beit3-search/demo-<model>.",
            ),
        ] = None,
        port: Annotated[int, typer.Option(metavar="PORT", min=1, max=65535)] = 8501,
        host: Annotated[str, typer.Option(metavar="ADDR")] = "127.0.0.1",
        serve: Annotated[bool, typer.Option(help="Start the app when the index is ready.")] = True,
    ) -> None:
        """Index the bundled emoji images and names with the bundled model, then serve the app."""
        from app.cli_index import progress_bars
        from app.demo import build_demo_index

        progress, close = progress_bars()
        try:
            path, images, texts = build_demo_index(db, progress=progress)
        finally:
            close()
        typer.echo(f"{images}\n{texts}\nindex: {path}")
        if serve:
            typer.echo(f"beit3 demo: open http://{host}:{port}  (Ctrl+C stops)")
            _serve(streamlit_command([path], host=host, port=port))


def _serve(command: list[str]) -> None:
    import subprocess

    try:
        status = subprocess.call(command)
    except KeyboardInterrupt:
        status = 0
    raise typer.Exit(status)
