"""Search results as JSON or CSV: the CLI's ``search --format`` (and any front end's download)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from indexer import Hit

__all__ = ["CSV_COLUMNS", "format_hits", "write_hits"]

# One CSV row per hit; ``paths`` joins every path with this content by " | "; ``similar``: the
# near-duplicates folded into the hit by --collapse (0 without it).
CSV_COLUMNS = (
    "rank",
    "score",
    "match",
    "table",
    "modality",
    "id",
    "path",
    "text",
    "paths",
    "similar",
)


def format_hits(hits: Sequence[Hit], fmt: str) -> str:
    """``json``: a list of :meth:`Hit.to_dict`; ``csv``: a header and one row per hit."""
    if fmt == "json":
        return json.dumps([h.to_dict() for h in hits], indent=1, ensure_ascii=False) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for hit in hits:
        data = hit.to_dict()
        data["paths"] = " | ".join(hit.paths)
        writer.writerow(["" if data[c] is None else data[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def write_hits(hits: Sequence[Hit], fmt: str, output: Path | None) -> None:
    """Write :func:`format_hits` to ``output`` (UTF-8), or to stdout when it is None."""
    text = format_hits(hits, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
