"""The ``beit3`` command line.

Each subcommand validates its arguments, calls one library function and prints a summary. Heavy
imports (torch, lancedb, streamlit) happen inside the commands so ``beit3 --help`` is instant.
Errors caused by input print ``error: <message>`` on one line and exit 2; other failures exit 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.exceptions
from typer.core import TyperGroup

__all__ = ["cli", "main"]


class _Group(TyperGroup):
    """Turns library errors into one line on stderr and an exit status."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.exceptions.TyperException, typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the one place that reports any failure
            from beit3.errors import Beit3Error

            if (ctx.obj or {}).get("debug"):
                raise
            bad_input = isinstance(exc, Beit3Error)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not bad_input:
                message = f"{type(exc).__name__}: {message} (rerun with --debug for the traceback)"
            typer.echo(f"error: {message}", err=True)
            ctx.exit(2 if bad_input else 1)


cli = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    help="BEiT-3 cross-modal search: pretrain, fine-tune, index, search, and the app.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@cli.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s",
        handlers=[_StderrHandler()],
        force=True,
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, not the stream it was
    created with: a caller that swaps stderr (a test runner, CliRunner) and closes its stream
    afterwards leaves no handler behind that writes to a closed file."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@cli.command()
def presets() -> None:
    """List the model presets with their sizes."""
    import torch

    from beit3 import create_model, get_preset, list_presets

    for name in list_presets():
        cfg = get_preset(name)
        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(name).parameters())
        typer.echo(
            f"{name:18s} depth {cfg.depth:2d}  width {cfg.embed_dim:4d}  heads {cfg.num_heads:2d}  "
            f"image {cfg.img_size}/{cfg.patch_size}  {params / 1e6:8.1f}M params"
        )


@cli.command()
def convert(
    pth: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Official .pth file.")],
    output: Annotated[Path, typer.Argument(file_okay=False, help="Checkpoint directory to write.")],
    spm: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="Sentencepiece model (beit3.spm).")
    ],
    preset: Annotated[str | None, typer.Option(help="Target preset; inferred if omitted.")] = None,
    img_size: Annotated[
        int | None, typer.Option(help="Interpolate positions to this size.")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Allow pickled objects (trusted files only).")
    ] = False,
) -> None:
    """Convert an official BEiT-3 .pth checkpoint into a checkpoint directory."""
    from beit3 import import_official

    model_id = import_official(
        pth, output, spm=spm, preset=preset, img_size=img_size, allow_pickle=allow_pickle
    )
    typer.echo(f"wrote {output} ({model_id})")


def _register_subcommands() -> None:
    from app import cli_app, cli_index, cli_pretrain, cli_serve, cli_train, cli_versions
    from app.cli_improve import register as register_improve

    for module in (cli_index, cli_train, cli_pretrain, cli_app, cli_serve, cli_versions):
        module.register(cli)
    register_improve(cli)  # improve, feedback


_register_subcommands()


def main() -> None:
    cli(prog_name="beit3")


if __name__ == "__main__":
    main()
