"""`beit3 index images|texts` and `beit3 search` (registered by app.cli)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

_DB = typer.Option("--db", file_okay=False, help="Index directory.")
_MODEL = typer.Option(
    "--model",
    exists=True,
    file_okay=False,
    help="Checkpoint directory (default: the one the index was built with).",
)
_BACKEND = typer.Option("--backend", help="lancedb (default for a new table) or faiss.")
_INDEX_TYPE = typer.Option(
    "--index-type",
    help="faiss: flat (default)|hnsw|ivfpq; lancedb: "
    "auto (default: IVF_FLAT from 20k rows)|exact|ivf_flat|ivf_pq|"
    "ivf_hnsw_sq.",
)
_DEVICE = typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")


def _progress_bars() -> tuple[Any, Any]:
    """A progress(stage, done, total) callback drawing one tqdm bar per stage, and a closer."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(
                total=total, desc=stage, unit="item", dynamic_ncols=True, leave=False, disable=None
            )
        bar.total = total
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs CPU-feature probes
    return progress, close


def register(cli: typer.Typer) -> None:
    """Add ``index images``, ``index texts`` and ``search`` to ``cli``."""
    index_cli = typer.Typer(
        help="Embed image folders or text files into an index.", no_args_is_help=True
    )
    cli.add_typer(index_cli, name="index")

    @index_cli.command("images")
    def index_images_cmd(
        paths: Annotated[
            list[Path],
            typer.Argument(
                exists=True,
                help="Image folders (recursive), image files, or JSONL/JSON/CSV/TSV manifests.",
            ),
        ],
        db: Annotated[Path, _DB],
        model: Annotated[Path | None, _MODEL] = None,
        backend: Annotated[str | None, _BACKEND] = None,
        index_type: Annotated[str | None, _INDEX_TYPE] = None,
        table: Annotated[str, typer.Option(help="Table name.")] = "images",
        batch_size: Annotated[int, typer.Option(min=1)] = 64,
        workers: Annotated[int, typer.Option(min=0, help="Decoding processes.")] = 2,
        device: Annotated[str, _DEVICE] = "auto",
    ) -> None:
        """Embed images into the index (incremental: only new or changed files are embedded)."""
        from indexer import index_images

        progress, close = _progress_bars()
        try:
            report = index_images(
                paths,
                db,
                model,
                backend=backend,
                table=table,
                batch_size=batch_size,
                num_workers=workers,
                device=device,
                progress=progress,
                index_type=index_type,
            )
        finally:
            close()
        typer.echo(str(report))

    @index_cli.command("texts")
    def index_texts_cmd(
        file: Annotated[
            Path,
            typer.Argument(
                exists=True, dir_okay=False, help="One text per line, or a JSONL/JSON/CSV/TSV file."
            ),
        ],
        db: Annotated[Path, _DB],
        model: Annotated[Path | None, _MODEL] = None,
        column: Annotated[str | None, typer.Option(help="JSON field / CSV column.")] = None,
        backend: Annotated[str | None, _BACKEND] = None,
        index_type: Annotated[str | None, _INDEX_TYPE] = None,
        table: Annotated[str, typer.Option(help="Table name.")] = "texts",
        batch_size: Annotated[int, typer.Option(min=1)] = 256,
        device: Annotated[str, _DEVICE] = "auto",
    ) -> None:
        """Embed texts into the index (incremental: only new texts are embedded)."""
        from indexer import index_texts

        progress, close = _progress_bars()
        try:
            report = index_texts(
                file,
                db,
                model,
                column=column,
                table=table,
                backend=backend,
                batch_size=batch_size,
                device=device,
                progress=progress,
                index_type=index_type,
            )
        finally:
            close()
        typer.echo(str(report))

    @cli.command("search")
    def search_cmd(
        query: Annotated[str, typer.Argument(help="Words, or with --image an image file.")],
        db: Annotated[Path, _DB],
        table: Annotated[
            str | None, typer.Option(help="Table to search (default: images if the index has it).")
        ] = None,
        image: Annotated[bool, typer.Option("--image", help="QUERY is an image file.")] = False,
        k: Annotated[int, typer.Option("--k", min=1)] = 10,
        offset: Annotated[int, typer.Option(min=0)] = 0,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
        rerank: Annotated[
            int,
            typer.Option(
                min=0, help="Re-score the top N with the fusion encoder (needs an --itm model)."
            ),
        ] = 0,
        min_match: Annotated[
            float | None,
            typer.Option(min=0.0, max=1.0, help="With --rerank: drop hits below this match."),
        ] = None,
        model: Annotated[Path | None, _MODEL] = None,
        device: Annotated[str, _DEVICE] = "auto",
    ) -> None:
        """Search an index with a text or an image; prints rank, score (and match) and path or
        text."""
        from beit3.errors import InputDataError
        from indexer import Searcher

        logging.getLogger("faiss").setLevel(logging.WARNING)
        searcher = Searcher(db, model=model, device=device)
        if image and not Path(query).is_file():
            raise InputDataError(f"{query}: no such image file (--image takes a path)")
        names = list(searcher.manifest.tables)
        table = table or ("images" if "images" in names or not names else names[0])
        hits = searcher.search(
            Path(query) if image else query,
            table,
            k=k,
            offset=offset,
            rerank=rerank,
            min_match=min_match,
        )
        if as_json:
            typer.echo(json.dumps([h.to_dict() for h in hits], indent=1))
            return
        for h in hits:
            shown = h.text
            if h.modality == "image":  # with the caption of a manifest, when it had one
                shown = f"{h.path}  {h.text}" if h.text else h.path
            match = f"  match {h.match:5.1%}" if h.match is not None else ""
            typer.echo(f"{h.rank:4d}  {h.score:7.4f}{match}  {shown}")
        if rerank and not hits:
            typer.echo(
                f"no confident match (none of the top {rerank} reaches match >= {min_match})",
                err=True,
            )
