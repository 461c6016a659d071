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
_QUANTIZE = typer.Option(
    "--quantize",
    help="int8: embed with the int8 encoder on the CPU (about 2x faster; queries use it too). "
    "Default: the encoder of the version updated (fp32 for a new one).",
)
_ACTIVATE = typer.Option(
    "--activate",
    help="With a new --model: make the version built the active one when the run finishes "
    "(default: the active version keeps serving; switch with beit3 versions activate).",
)
EXPORT_LIMIT = 100  # hits exported by search --format without --limit


def progress_bars() -> tuple[Any, Any]:
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


def _echo_report(report: Any, db: Path) -> None:
    """The run's summary, and how to activate the version it built when that is not active."""
    from indexer.manifest import DbManifest

    typer.echo(str(report))
    manifest = DbManifest.read(db)
    active = manifest.active(report.table) if manifest is not None else None
    if active is not None and active.id != report.version:
        typer.echo(
            f"version {report.version} of {report.table!r} built beside the active "
            f"{active.id}; switch with: beit3 versions activate {report.version} --db {db}"
        )
    elif report.activated:
        typer.echo(f"version {report.version} of {report.table!r} is now active")


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
        activate: Annotated[bool, _ACTIVATE] = False,
        quantize: Annotated[str | None, _QUANTIZE] = None,
    ) -> None:
        """Embed images into the index (incremental: only new or changed files are embedded)."""
        from indexer import index_images

        progress, close = progress_bars()
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
                activate=activate,
                quantize=quantize,
            )
        finally:
            close()
        _echo_report(report, db)

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
        activate: Annotated[bool, _ACTIVATE] = False,
        quantize: Annotated[str | None, _QUANTIZE] = None,
    ) -> None:
        """Embed texts into the index (incremental: only new texts are embedded)."""
        from indexer import index_texts

        progress, close = progress_bars()
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
                activate=activate,
                quantize=quantize,
            )
        finally:
            close()
        _echo_report(report, db)

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
        mode: Annotated[
            str, typer.Option(help="vector (default) | keyword (file names, captions) | hybrid.")
        ] = "vector",
        keywords: Annotated[
            str | None,
            typer.Option(help="Words for keyword/hybrid mode with --image (default: QUERY)."),
        ] = None,
        under: Annotated[
            list[Path] | None, typer.Option(help="Only files under this folder (repeatable).")
        ] = None,
        file_type: Annotated[
            list[str] | None, typer.Option("--type", help="Only this extension (repeatable).")
        ] = None,
        modified_after: Annotated[str | None, typer.Option(help="YYYY-MM-DD[THH:MM].")] = None,
        modified_before: Annotated[str | None, typer.Option(help="YYYY-MM-DD[THH:MM].")] = None,
        min_width: Annotated[int | None, typer.Option(min=0, help="Pixels.")] = None,
        max_width: Annotated[int | None, typer.Option(min=0)] = None,
        min_height: Annotated[int | None, typer.Option(min=0)] = None,
        max_height: Annotated[int | None, typer.Option(min=0)] = None,
        taken_after: Annotated[
            str | None, typer.Option(help="EXIF date taken, YYYY-MM-DD.")
        ] = None,
        taken_before: Annotated[str | None, typer.Option(help="EXIF date taken.")] = None,
        camera: Annotated[str | None, typer.Option(help="Part of the EXIF make/model.")] = None,
        where: Annotated[
            str | None, typer.Option(help="Raw SQL over the row columns, e.g. 'size > 1e6'.")
        ] = None,
        output_format: Annotated[
            str | None,
            typer.Option("--format", help="json | csv: every hit up to --limit (all pages)."),
        ] = None,
        limit: Annotated[
            int | None, typer.Option(min=1, help="With --format: hits to export (default 100).")
        ] = None,
        output: Annotated[
            Path | None, typer.Option(dir_okay=False, help="With --format: write to FILE.")
        ] = None,
        collapse: Annotated[
            float | None,
            typer.Option(
                min=-1.0, max=1.0, help="Fold hits closer than this cosine to a better hit (0.95)."
            ),
        ] = None,
    ) -> None:
        """Search an index with a text or an image; prints rank, score (and match) and path or
        text. Filters apply before ranking; --format exports the result list."""
        from beit3.errors import InputDataError
        from indexer import Searcher

        if output_format not in (None, "json", "csv"):
            raise InputDataError(f"--format: unknown format {output_format!r}; choose json or csv")
        if (limit is not None or output is not None) and output_format is None:
            raise InputDataError("--limit and --output go with --format json|csv")
        logging.getLogger("faiss").setLevel(logging.WARNING)
        searcher = Searcher(db, model=model, device=device)
        if image and not Path(query).is_file():
            raise InputDataError(f"{query}: no such image file (--image takes a path)")
        from indexer import Filters

        filters = Filters(
            under=tuple(under or ()),
            types=tuple(file_type or ()),
            modified_after=modified_after,
            modified_before=modified_before,
            min_width=min_width,
            max_width=max_width,
            min_height=min_height,
            max_height=max_height,
            taken_after=taken_after,
            taken_before=taken_before,
            camera=camera,
            where=where,
        )
        names = list(searcher.manifest.searchable())
        table = table or ("images" if "images" in names or not names else names[0])
        from indexer.query import CompositeQuery, is_compositional, parse_query, run_query

        page = {
            "k": (limit or EXPORT_LIMIT) if output_format else k,
            "offset": 0 if output_format else offset,
            "mode": mode,
            "filters": filters,
            "keyword_text": keywords,
        }
        steered = collapse is not None or (not image and is_compositional(query))
        if steered and (rerank or min_match is not None):
            raise InputDataError("--rerank takes a plain query, without --collapse or + / - terms")
        if steered:  # the query syntax of indexer.query (README "Query syntax")
            composite = (
                CompositeQuery.of(Path(query))
                if image
                else parse_query(query)
                if is_compositional(query)
                else CompositeQuery.of(query)
            )
            hits = run_query(searcher, composite, table, collapse=collapse, **page)
        else:
            hits = searcher.search(
                Path(query) if image else query,
                table,
                rerank=rerank,
                min_match=min_match,
                **page,
            )
        if output_format is not None:
            from app.export import write_hits

            write_hits(hits, output_format, output)
            if output is not None:
                typer.echo(f"wrote {len(hits)} hits to {output}", err=True)
            return
        if as_json:
            typer.echo(json.dumps([h.to_dict() for h in hits], indent=1))
            return
        for h in hits:
            shown = h.text
            if h.modality == "image":  # with the caption of a manifest, when it had one
                shown = f"{h.path}  {h.text}" if h.text else h.path
            match = f"  match {h.match:5.1%}" if h.match is not None else ""
            similar = f"  (+{h.similar} similar)" if h.similar else ""
            typer.echo(f"{h.rank:4d}  {h.score:7.4f}{match}  {shown}{similar}")
        if rerank and not hits:
            typer.echo(
                f"no confident match (none of the top {rerank} reaches match >= {min_match})",
                err=True,
            )
